//! TCP rendezvous: rank 0 hands an opaque id (NCCL's 128-byte unique id) to every rank before the
//! NCCL communicator is created.
//!
//! Rank 0 listens on `MASTER_PORT` (all interfaces of the address family of `MASTER_ADDR`) and waits
//! until every other rank has connected and said hello; then it answers every rank with the id, so
//! [`share_id`] also acts as a start-up barrier. Clients retry connecting until the deadline, since
//! rank 0 may start later. Rank 0 validates each hello (protocol magic and version, rank range,
//! world size, duplicates); on a problem it fails with an error naming the offending rank and tells
//! every connected rank why, so they fail at once instead of at the deadline.
//!
//! Wire format (little-endian):
//! * hello, client → rank 0: `MAGIC (8 bytes) | version u32 | rank u64 | world_size u64`;
//! * reply, rank 0 → client: `MAGIC | status u8 (0 = id, 1 = error) | len u32 | len bytes`
//!   (the id, or a UTF-8 message).
//!
//! Only `std::net`: no async runtime. Every blocking call has a timeout derived from the deadline.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::launch::LaunchEnv;

/// First bytes of every message: tells a fast-llm-rs rendezvous from anything else on the port.
pub const MAGIC: [u8; 8] = *b"FLRSRDZV";
/// Protocol version; ranks with different versions refuse each other.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest id (or error message) a reply may carry.
pub const MAX_PAYLOAD: usize = 1 << 20;

const HELLO_LEN: usize = 8 + 4 + 8 + 8;
const STATUS_ID: u8 = 0;
const STATUS_ERROR: u8 = 1;

/// A failed rendezvous. Every message is one line.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RendezvousError {
    /// Rank 0 was called without an id to share.
    #[error("rendezvous: rank 0 must be given the id to share")]
    MissingId,
    /// The id is larger than the protocol allows.
    #[error("rendezvous: the id is {len} bytes, more than the {max} allowed", max = MAX_PAYLOAD)]
    IdTooLarge { len: usize },
    /// Rank 0 could not listen.
    #[error("rank 0 could not listen on {addr} (MASTER_PORT): {reason}; is another job using this port? set MASTER_PORT to a free one")]
    Bind { addr: String, reason: String },
    /// Rank 0's deadline passed before every rank arrived.
    #[error("rank 0 timed out after {timeout_s:.1} s waiting for rank(s) {missing:?} of {world_size} at port {port}{extra}: not started, crashed, or given another MASTER_ADDR/MASTER_PORT?")]
    MissingRanks {
        missing: Vec<usize>,
        world_size: usize,
        port: u16,
        timeout_s: f64,
        /// Notes on rejected connections, empty if none.
        extra: String,
    },
    /// A client could not reach rank 0 before its deadline.
    #[error("rank {rank} could not reach rank 0 at MASTER_ADDR:MASTER_PORT = {addr} within {timeout_s:.1} s (last error: {last_error}); is rank 0 running, and do all ranks have the same MASTER_ADDR/MASTER_PORT?")]
    Unreachable {
        rank: usize,
        addr: String,
        timeout_s: f64,
        last_error: String,
    },
    /// A client connected but got no answer before its deadline.
    #[error("rank {rank} connected to rank 0 at {addr} but got no reply within {timeout_s:.1} s: rank 0 is still waiting for other ranks (are all of them started?)")]
    NoReply { rank: usize, addr: String, timeout_s: f64 },
    /// Rank 0 refused this client, or failed and told it why; `reason` is rank 0's message.
    #[error("rank {rank}: the rendezvous failed at rank 0 ({addr}): {reason}")]
    Refused { rank: usize, addr: String, reason: String },
    /// Two processes claim the same rank.
    #[error(
        "rank {rank} joined the rendezvous twice (from {first} and {second}): check RANK/SLURM_PROCID of each process"
    )]
    DuplicateRank { rank: usize, first: String, second: String },
    /// A client's rank does not fit rank 0's world size (or is 0, rank 0's own).
    #[error("a process at {peer} claims rank {rank}, which is not in 1..{world_size} (rank 0 is the server): check RANK/SLURM_PROCID")]
    BadRank { rank: u64, world_size: usize, peer: String },
    /// A client disagrees on the world size.
    #[error("rank {rank} (at {peer}) has world size {theirs} but rank 0 has {ours}: all ranks must have the same WORLD_SIZE/SLURM_NTASKS")]
    WorldSizeMismatch {
        rank: u64,
        peer: String,
        theirs: u64,
        ours: usize,
    },
    /// A client speaks another protocol version.
    #[error("rank {rank} (at {peer}) speaks rendezvous protocol version {theirs}, rank 0 speaks {ours}: run the same fast-llm-rs build on every node")]
    VersionMismatch {
        rank: u64,
        peer: String,
        theirs: u32,
        ours: u32,
    },
    /// A malformed message, or a socket error after the connection was made.
    #[error("rendezvous with {peer}: {reason}")]
    Protocol { peer: String, reason: String },
}

/// Shares rank 0's `id_if_rank0` with every rank of `env`, within `timeout`; every rank returns the
/// id. Rank 0 must pass `Some(id)`; other ranks' argument is ignored. With one rank, returns the id
/// at once. See the module docs for the protocol and the failure behaviour.
pub fn share_id(env: &LaunchEnv, id_if_rank0: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>, RendezvousError> {
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        let id = id_if_rank0.ok_or(RendezvousError::MissingId)?;
        if id.len() > MAX_PAYLOAD {
            return Err(RendezvousError::IdTooLarge { len: id.len() });
        }
        if env.world_size > 1 {
            serve(env, id, timeout, deadline)?;
        }
        Ok(id.to_vec())
    } else {
        join(env, timeout, deadline)
    }
}

/// Time left until `deadline`, at least 1 ms (a zero socket timeout means "none").
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// The wildcard address of `master_addr`'s family (IPv4 unless it resolves to IPv6 only).
fn listen_addr(env: &LaunchEnv) -> SocketAddr {
    let v6 = (env.master_addr.as_str(), env.master_port)
        .to_socket_addrs()
        .map(|mut addrs| addrs.all(|a| a.is_ipv6()))
        .unwrap_or(false);
    let ip = if v6 { "::" } else { "0.0.0.0" };
    SocketAddr::new(ip.parse().expect("literal IP"), env.master_port)
}

/// A client that has said a valid hello and waits for the reply.
struct Waiting {
    rank: usize,
    peer: String,
    stream: TcpStream,
}

/// Rank 0: accept `world_size - 1` valid hellos, then send `id` to each.
fn serve(env: &LaunchEnv, id: &[u8], timeout: Duration, deadline: Instant) -> Result<(), RendezvousError> {
    let addr = listen_addr(env);
    let listener = TcpListener::bind(addr).map_err(|e| RendezvousError::Bind {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    listener.set_nonblocking(true).map_err(|e| RendezvousError::Bind {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    let mut waiting: Vec<Waiting> = Vec::with_capacity(env.world_size - 1);
    let mut rejected: Vec<String> = Vec::new();
    let fail = |waiting: &mut Vec<Waiting>, err: RendezvousError| {
        let msg = err.to_string();
        for w in waiting.iter_mut() {
            let _ = send_reply(&mut w.stream, STATUS_ERROR, msg.as_bytes(), deadline);
        }
        err
    };
    while waiting.len() < env.world_size - 1 {
        let (mut stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    let missing = (1..env.world_size)
                        .filter(|r| !waiting.iter().any(|w| w.rank == *r))
                        .collect();
                    let extra = if rejected.is_empty() {
                        String::new()
                    } else {
                        format!(" (ignored {} connection(s): {})", rejected.len(), rejected.join("; "))
                    };
                    let err = RendezvousError::MissingRanks {
                        missing,
                        world_size: env.world_size,
                        port: env.master_port,
                        timeout_s: timeout.as_secs_f64(),
                        extra,
                    };
                    return Err(fail(&mut waiting, err));
                }
                thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => {
                let err = RendezvousError::Protocol {
                    peer: addr.to_string(),
                    reason: format!("accept failed: {e}"),
                };
                return Err(fail(&mut waiting, err));
            }
        };
        let peer = peer.to_string();
        let hello = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(remaining(deadline))))
            .and_then(|()| read_exact_or_eof(&mut stream, HELLO_LEN));
        let hello = match hello {
            Ok(Some(bytes)) if bytes[..8] == MAGIC => bytes,
            // Not a rendezvous client (a port scanner, another program): drop it and keep waiting.
            Ok(Some(_)) => {
                rejected.push(format!("{peer} sent no rendezvous magic"));
                continue;
            }
            Ok(None) => {
                rejected.push(format!("{peer} closed before its hello"));
                continue;
            }
            Err(e) => {
                rejected.push(format!("{peer}: {e}"));
                continue;
            }
        };
        let version = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes"));
        let rank = u64::from_le_bytes(hello[12..20].try_into().expect("8 bytes"));
        let their_world = u64::from_le_bytes(hello[20..28].try_into().expect("8 bytes"));
        let problem = if version != PROTOCOL_VERSION {
            Some(RendezvousError::VersionMismatch {
                rank,
                peer: peer.clone(),
                theirs: version,
                ours: PROTOCOL_VERSION,
            })
        } else if their_world != env.world_size as u64 {
            Some(RendezvousError::WorldSizeMismatch {
                rank,
                peer: peer.clone(),
                theirs: their_world,
                ours: env.world_size,
            })
        } else if rank == 0 || rank >= env.world_size as u64 {
            Some(RendezvousError::BadRank {
                rank,
                world_size: env.world_size,
                peer: peer.clone(),
            })
        } else {
            waiting
                .iter()
                .find(|w| w.rank as u64 == rank)
                .map(|first| RendezvousError::DuplicateRank {
                    rank: rank as usize,
                    first: first.peer.clone(),
                    second: peer.clone(),
                })
        };
        if let Some(err) = problem {
            let _ = send_reply(&mut stream, STATUS_ERROR, err.to_string().as_bytes(), deadline);
            return Err(fail(&mut waiting, err));
        }
        waiting.push(Waiting {
            rank: rank as usize,
            peer,
            stream,
        });
    }
    for w in &mut waiting {
        send_reply(&mut w.stream, STATUS_ID, id, deadline).map_err(|e| RendezvousError::Protocol {
            peer: format!("rank {} at {}", w.rank, w.peer),
            reason: format!("sending the id failed: {e}"),
        })?;
    }
    Ok(())
}

/// Any other rank: connect to rank 0 (retrying until the deadline), say hello, read the reply.
fn join(env: &LaunchEnv, timeout: Duration, deadline: Instant) -> Result<Vec<u8>, RendezvousError> {
    let target = format!("{}:{}", env.master_addr, env.master_port);
    let timeout_s = timeout.as_secs_f64();
    let mut backoff = Duration::from_millis(5);
    let mut stream = loop {
        let attempt = (env.master_addr.as_str(), env.master_port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve MASTER_ADDR '{}': {e}", env.master_addr))
            .and_then(|addrs| {
                let mut err = format!("MASTER_ADDR '{}' resolves to no address", env.master_addr);
                for a in addrs {
                    match TcpStream::connect_timeout(&a, remaining(deadline).min(Duration::from_secs(2))) {
                        Ok(s) => return Ok(s),
                        Err(e) => err = e.to_string(),
                    }
                }
                Err(err)
            });
        let last_error = match attempt {
            Ok(s) => break s,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(RendezvousError::Unreachable {
                rank: env.rank,
                addr: target,
                timeout_s,
                last_error,
            });
        }
        thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(Duration::from_millis(200));
    };
    let io_err = |what: &str, e: io::Error| RendezvousError::Protocol {
        peer: format!("rank 0 at {target}"),
        reason: format!("{what}: {e}"),
    };
    let _ = stream.set_nodelay(true);
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hello.extend_from_slice(&(env.rank as u64).to_le_bytes());
    hello.extend_from_slice(&(env.world_size as u64).to_le_bytes());
    stream
        .set_write_timeout(Some(remaining(deadline)))
        .and_then(|()| stream.write_all(&hello))
        .map_err(|e| io_err("sending the hello failed", e))?;
    stream
        .set_read_timeout(Some(remaining(deadline)))
        .map_err(|e| io_err("setting the read timeout failed", e))?;
    let header = match read_exact_or_eof(&mut stream, 8 + 1 + 4) {
        Ok(Some(h)) => h,
        Ok(None) => {
            return Err(RendezvousError::Protocol {
                peer: format!("rank 0 at {target}"),
                reason: "closed the connection without a reply (did rank 0 fail?)".into(),
            })
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err(RendezvousError::NoReply {
                rank: env.rank,
                addr: target,
                timeout_s,
            })
        }
        Err(e) => return Err(io_err("reading the reply failed", e)),
    };
    if header[..8] != MAGIC {
        return Err(RendezvousError::Protocol {
            peer: target,
            reason: "the reply is not from a fast-llm-rs rendezvous (is another program using MASTER_PORT?)".into(),
        });
    }
    let status = header[8];
    let len = u32::from_le_bytes(header[9..13].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD || (status != STATUS_ID && status != STATUS_ERROR) {
        return Err(RendezvousError::Protocol {
            peer: target,
            reason: format!("malformed reply (status {status}, length {len})"),
        });
    }
    let payload = match read_exact_or_eof(&mut stream, len) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(RendezvousError::Protocol {
                peer: format!("rank 0 at {target}"),
                reason: "the reply was cut short".into(),
            })
        }
        Err(e) => return Err(io_err("reading the reply failed", e)),
    };
    if status == STATUS_ERROR {
        return Err(RendezvousError::Refused {
            rank: env.rank,
            addr: target,
            reason: String::from_utf8_lossy(&payload).into_owned(),
        });
    }
    Ok(payload)
}

fn send_reply(stream: &mut TcpStream, status: u8, payload: &[u8], deadline: Instant) -> io::Result<()> {
    let mut msg = Vec::with_capacity(13 + payload.len());
    msg.extend_from_slice(&MAGIC);
    msg.push(status);
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    stream.set_write_timeout(Some(remaining(deadline)))?;
    stream.write_all(&msg)?;
    stream.flush()
}

/// Reads exactly `len` bytes; `Ok(None)` if the peer closes first.
fn read_exact_or_eof(stream: &mut TcpStream, len: usize) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; len];
    match stream.read_exact(&mut buf) {
        Ok(()) => Ok(Some(buf)),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::distributed::launch::{self, LaunchSource};
    use std::process::{Command, Stdio};

    /// A port that was free a moment ago (bind port 0, read it, release it).
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn env(rank: usize, world_size: usize, port: u16) -> LaunchEnv {
        LaunchEnv {
            rank,
            world_size,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            source: LaunchSource::Torchrun,
        }
    }

    const ID: &[u8] = b"nccl-unique-id-0123456789abcdef";

    /// Runs one thread per `(rank, world_size)`; rank 0 (if listed) shares [`ID`].
    fn run_threads(
        ranks: &[(usize, usize)],
        port: u16,
        timeout: Duration,
    ) -> Vec<(usize, Result<Vec<u8>, RendezvousError>)> {
        let handles: Vec<_> = ranks
            .iter()
            .map(|&(rank, world)| {
                thread::spawn(move || {
                    let id = (rank == 0).then_some(ID);
                    (rank, share_id(&env(rank, world, port), id, timeout))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn four_ranks_as_threads_get_rank0_id() {
        let port = free_port();
        // Rank 0 starts last: clients must retry.
        let t0 = Instant::now();
        let results = run_threads(&[(3, 4), (1, 4), (2, 4), (0, 4)], port, Duration::from_secs(2));
        for (rank, r) in results {
            assert_eq!(r.unwrap(), ID, "rank {rank}");
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[test]
    fn rank0_started_late_is_found() {
        let port = free_port();
        let client = thread::spawn(move || share_id(&env(1, 2, port), None, Duration::from_millis(800)));
        thread::sleep(Duration::from_millis(150));
        assert_eq!(
            share_id(&env(0, 2, port), Some(ID), Duration::from_millis(800)).unwrap(),
            ID
        );
        assert_eq!(client.join().unwrap().unwrap(), ID);
    }

    #[test]
    fn single_rank_needs_no_network() {
        // Port 1 is privileged and unused: a world of one must not touch it.
        assert_eq!(
            share_id(&env(0, 1, 1), Some(ID), Duration::from_millis(10)).unwrap(),
            ID
        );
        assert_eq!(
            share_id(&env(0, 2, 1), None, Duration::from_millis(10)),
            Err(RendezvousError::MissingId)
        );
    }

    #[test]
    fn missing_rank_is_named_by_rank0_and_waiting_ranks_are_told() {
        let port = free_port();
        let t0 = Instant::now();
        // Clients wait longer than rank 0, so they hear its verdict rather than time out themselves.
        let server = thread::spawn(move || (0, share_id(&env(0, 4, port), Some(ID), Duration::from_millis(400))));
        let mut results = run_threads(&[(1, 4), (3, 4)], port, Duration::from_millis(1000));
        results.push(server.join().unwrap());
        let elapsed = t0.elapsed();
        assert!(elapsed < Duration::from_millis(2000), "{elapsed:?}");
        for (rank, r) in results {
            let e = r.unwrap_err();
            let msg = e.to_string();
            if rank == 0 {
                assert!(
                    matches!(&e, RendezvousError::MissingRanks { missing, .. } if missing == &[2]),
                    "{msg}"
                );
                assert!(
                    msg.starts_with("rank 0 timed out after 0.4 s waiting for rank(s) [2] of 4"),
                    "{msg}"
                );
            } else {
                assert!(matches!(e, RendezvousError::Refused { .. }), "rank {rank}: {msg}");
                assert!(msg.contains("waiting for rank(s) [2]"), "{msg}");
            }
        }
    }

    #[test]
    fn absent_rank0_is_named_by_clients() {
        let port = free_port();
        let t0 = Instant::now();
        let e = share_id(&env(2, 3, port), None, Duration::from_millis(300)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_millis(2000), "{:?}", t0.elapsed());
        let msg = e.to_string();
        assert!(matches!(e, RendezvousError::Unreachable { rank: 2, .. }), "{msg}");
        assert!(
            msg.starts_with(&format!(
                "rank 2 could not reach rank 0 at MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port} within 0.3 s"
            )),
            "{msg}"
        );
    }

    #[test]
    fn silent_rank0_gives_no_reply_error() {
        // Something accepts on the port but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let e = share_id(&env(1, 2, port), None, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, RendezvousError::NoReply { rank: 1, .. }), "{e}");
        drop(listener);
    }

    #[test]
    fn duplicate_rank_is_refused() {
        let port = free_port();
        let results = run_threads(&[(0, 3), (1, 3), (1, 3)], port, Duration::from_millis(800));
        let msg0 = results[0].1.as_ref().unwrap_err().to_string();
        assert!(
            msg0.starts_with("rank 1 joined the rendezvous twice (from 127.0.0.1:"),
            "{msg0}"
        );
        for (_, r) in &results[1..] {
            let msg = r.as_ref().unwrap_err().to_string();
            assert!(msg.contains("): rank 1 joined the rendezvous twice"), "{msg}");
        }
    }

    #[test]
    fn out_of_range_rank_and_world_size_mismatch_are_refused() {
        let port = free_port();
        let results = run_threads(&[(0, 2), (5, 6)], port, Duration::from_millis(800));
        let msg0 = results[0].1.as_ref().unwrap_err().to_string();
        assert!(msg0.starts_with("rank 5 (at 127.0.0.1:"), "{msg0}");
        assert!(
            msg0.ends_with("has world size 6 but rank 0 has 2: all ranks must have the same WORLD_SIZE/SLURM_NTASKS")
        );
        assert!(matches!(results[1].1, Err(RendezvousError::Refused { rank: 5, .. })));

        // Rank 5 of 2 (not constructible through `launch::detect`, but through a hand-made env).
        let port = free_port();
        let results = run_threads(&[(0, 2), (5, 2)], port, Duration::from_millis(800));
        let e = results[0].1.as_ref().unwrap_err();
        assert!(
            matches!(
                e,
                RendezvousError::BadRank {
                    rank: 5,
                    world_size: 2,
                    ..
                }
            ),
            "{e}"
        );
        let msg1 = results[1].1.as_ref().unwrap_err().to_string();
        assert!(msg1.contains("claims rank 5, which is not in 1..2"), "{msg1}");
    }

    #[test]
    fn busy_port_is_a_bind_error() {
        let holder = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let e = share_id(&env(0, 2, port), Some(ID), Duration::from_millis(300)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("rank 0 could not listen on 0.0.0.0:{port} (MASTER_PORT): ")),
            "{msg}"
        );
    }

    #[test]
    fn rank_zero_claimed_by_client_is_refused() {
        let port = free_port();
        let server = thread::spawn(move || share_id(&env(0, 2, port), Some(ID), Duration::from_millis(800)));
        // A client that claims rank 0 (only possible through a hand-written hello).
        let msg = {
            let deadline = Instant::now() + Duration::from_millis(800);
            let mut s = loop {
                if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                    break s;
                }
                assert!(Instant::now() < deadline);
                thread::sleep(Duration::from_millis(5));
            };
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            hello.extend_from_slice(&0u64.to_le_bytes());
            hello.extend_from_slice(&2u64.to_le_bytes());
            s.write_all(&hello).unwrap();
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).unwrap();
            String::from_utf8_lossy(&reply[13..]).into_owned()
        };
        assert!(msg.contains("claims rank 0, which is not in 1..2"), "{msg}");
        let e = server.join().unwrap().unwrap_err();
        assert!(matches!(e, RendezvousError::BadRank { rank: 0, .. }), "{e}");
    }

    #[test]
    fn stray_connections_are_ignored_and_version_mismatch_refused() {
        let port = free_port();
        let server = thread::spawn(move || share_id(&env(0, 3, port), Some(ID), Duration::from_millis(800)));
        let connect = || loop {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                break s;
            }
            thread::sleep(Duration::from_millis(5));
        };
        // A stray client that sends garbage and one that closes at once: ignored.
        connect()
            .write_all(b"GET / HTTP/1.1\r\nHost: example.org\r\nAccept: */*\r\n\r\n")
            .unwrap();
        drop(connect());
        // A valid rank 1 still gets through ...
        let client = thread::spawn(move || share_id(&env(1, 3, port), None, Duration::from_millis(800)));
        // ... until a rank speaking another version makes rank 0 give up.
        thread::sleep(Duration::from_millis(50));
        let mut s = connect();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        hello.extend_from_slice(&2u64.to_le_bytes());
        hello.extend_from_slice(&3u64.to_le_bytes());
        s.write_all(&hello).unwrap();
        let e = server.join().unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                RendezvousError::VersionMismatch {
                    rank: 2,
                    theirs: 2,
                    ours: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = client.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("speaks rendezvous protocol version 2"), "{e}");
    }

    /// Child half of [`four_ranks_as_processes_get_rank0_id`]: a no-op unless the parent test
    /// re-executes this test binary with `FAST_LLM_RDZV_PROBE` set; then it reads torchrun-style
    /// variables from its real environment, shares the id and prints it.
    #[test]
    fn probe_child() {
        let Ok(id_text) = std::env::var("FAST_LLM_RDZV_PROBE") else {
            return;
        };
        let env = launch::detect_process_env().unwrap().expect("torchrun variables");
        let id = (env.rank == 0).then(|| id_text.as_bytes().to_vec());
        let t0 = Instant::now();
        match share_id(&env, id.as_deref(), Duration::from_millis(2500)) {
            Ok(got) => println!(
                "PROBE rank={} id={} ms={:.1}",
                env.rank,
                String::from_utf8(got).unwrap(),
                t0.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => println!("PROBE rank={} error={e}", env.rank),
        }
    }

    #[test]
    fn four_ranks_as_processes_get_rank0_id() {
        if std::env::var("FAST_LLM_RDZV_PROBE").is_ok() {
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let port = free_port();
        let world = 4;
        let id = format!("id-{port}-{}", std::process::id());
        let t0 = Instant::now();
        // Rank 0 last, so the others exercise the retry.
        let children: Vec<_> = (0..world)
            .rev()
            .map(|rank| {
                Command::new(&exe)
                    .args([
                        "--exact",
                        "engine::distributed::rendezvous::tests::probe_child",
                        "--nocapture",
                    ])
                    .args(["--test-threads", "1"])
                    .env_remove("SLURM_PROCID")
                    .env_remove("OMPI_COMM_WORLD_RANK")
                    .env("FAST_LLM_RDZV_PROBE", &id)
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("LOCAL_RANK", rank.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut seen = Vec::new();
        for child in children {
            let out = child.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout
                .lines()
                .find_map(|l| l.find("PROBE ").map(|at| &l[at..]))
                .unwrap_or_else(|| panic!("no PROBE line: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
            assert!(line.contains(&format!(" id={id} ")), "{line}");
            seen.push(line.to_string());
        }
        let total = t0.elapsed();
        eprintln!("4-process rendezvous (spawn to exit): {total:?}; {seen:?}");
        assert!(total < Duration::from_secs(5), "{total:?}");
    }
}
