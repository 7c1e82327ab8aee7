//! Finding and opening the NCCL shared library at run time (it is not linked at build time, so the
//! binary builds and runs its CPU paths on machines without CUDA).
//!
//! Search order (first hit wins):
//! 1. `FAST_LLM_NCCL_LIB`: a library file, or a directory holding one (an explicit choice: if it
//!    points at nothing, that is an error rather than a fall-through);
//! 2. each directory of `LD_LIBRARY_PATH`;
//! 3. pip wheels (`pip install nvidia-nccl-cu12`): `nvidia/nccl/lib` under the `site-packages` of
//!    `$VIRTUAL_ENV`, `$CONDA_PREFIX`, `~/.local`, `/usr/local` and `/usr` (`python3*` versions,
//!    `site-packages` and `dist-packages`), found without running Python;
//! 4. `$CONDA_PREFIX/lib` (conda's `nccl` package);
//! 5. system directories: `/usr/lib/x86_64-linux-gnu`, `/usr/local/cuda/lib64`, `/usr/lib64`,
//!    `/usr/local/lib`.
//!
//! In each directory the names [`LIB_NAMES`] are tried in order.

use std::ffi::c_int;
use std::path::{Path, PathBuf};

/// Environment variable that overrides the search: a path to the library or its directory.
pub const OVERRIDE_VAR: &str = "FAST_LLM_NCCL_LIB";
/// File names tried in each directory: the runtime soname first, then the development link.
pub const LIB_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];
/// System directories searched last (relative to `/`).
pub const SYSTEM_DIRS: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/local/cuda/lib64",
    "/usr/lib64",
    "/usr/local/lib",
];

const HOW_TO_FIX: &str = "install it with `pip install nvidia-nccl-cu12` (in the active environment) or set \
                          FAST_LLM_NCCL_LIB=/path/to/libnccl.so.2";

/// Path of the NCCL library, searched in the process environment (see the module docs). The error
/// lists every place searched and what to do.
pub fn find_nccl() -> Result<PathBuf, String> {
    find_nccl_with(&|name| std::env::var(name).ok())
}

/// [`find_nccl`] with the environment given as a lookup closure (variable name → value).
pub fn find_nccl_with(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, String> {
    find_nccl_under(env, Path::new("/"))
}

/// The search with every fixed absolute path (pip and system directories) taken under `root`
/// instead of `/`, so that tests can build a fake tree.
fn find_nccl_under(env: &dyn Fn(&str) -> Option<String>, root: &Path) -> Result<PathBuf, String> {
    let nonempty = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if let Some(path) = nonempty(OVERRIDE_VAR) {
        let path = PathBuf::from(path.trim());
        if path.is_file() {
            return Ok(path);
        }
        if path.is_dir() {
            if let Some(found) = lib_in(&path) {
                return Ok(found);
            }
            return Err(format!(
                "{OVERRIDE_VAR}={} is a directory without {}; point it at the NCCL library file",
                path.display(),
                LIB_NAMES.join(" or ")
            ));
        }
        return Err(format!(
            "{OVERRIDE_VAR}={} does not exist; point it at the NCCL library (libnccl.so.2) or unset it",
            path.display()
        ));
    }

    let mut searched: Vec<String> = vec![format!("{OVERRIDE_VAR} (unset)")];
    let mut dirs: Vec<PathBuf> = Vec::new();
    match nonempty("LD_LIBRARY_PATH") {
        Some(paths) => dirs.extend(paths.split(':').filter(|d| !d.is_empty()).map(PathBuf::from)),
        None => searched.push("LD_LIBRARY_PATH (unset)".into()),
    }
    for (base, lib_dirs) in python_prefixes(&nonempty, root) {
        let mut any = false;
        for lib_dir in &lib_dirs {
            for python in python_dirs(&base.join(lib_dir)) {
                for packages in ["site-packages", "dist-packages"] {
                    let dir = python.join(packages).join("nvidia/nccl/lib");
                    if dir.is_dir() {
                        any = true;
                        dirs.push(dir);
                    }
                }
            }
        }
        if !any {
            searched.push(format!(
                "{}/{}/python3*/{{site,dist}}-packages/nvidia/nccl/lib (none)",
                base.display(),
                lib_dirs.join("|")
            ));
        }
    }
    if let Some(conda) = nonempty("CONDA_PREFIX") {
        dirs.push(PathBuf::from(conda).join("lib"));
    }
    dirs.extend(SYSTEM_DIRS.iter().map(|d| under(root, d)));

    let mut seen: Vec<&PathBuf> = Vec::new();
    for dir in &dirs {
        if seen.contains(&dir) {
            continue;
        }
        seen.push(dir);
        if let Some(found) = lib_in(dir) {
            return Ok(found);
        }
        searched.push(dir.display().to_string());
    }
    Err(format!(
        "NCCL library ({}) not found; searched: {}; {HOW_TO_FIX}",
        LIB_NAMES.join(", "),
        searched.join(", ")
    ))
}

/// Prefixes whose `lib/python3*` (or `lib64/...`) may hold `site-packages` with NCCL's pip wheel.
fn python_prefixes(env: &dyn Fn(&str) -> Option<String>, root: &Path) -> Vec<(PathBuf, Vec<&'static str>)> {
    let mut prefixes = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = env(var) {
            prefixes.push((PathBuf::from(prefix), vec!["lib", "lib64"]));
        }
    }
    if let Some(home) = env("HOME") {
        prefixes.push((PathBuf::from(home).join(".local"), vec!["lib"]));
    }
    prefixes.push((under(root, "/usr/local"), vec!["lib", "lib64"]));
    prefixes.push((under(root, "/usr"), vec!["lib", "lib64"]));
    prefixes
}

/// `dir/python3*` directories, sorted newest-looking last-first (`python3.12` before `python3.9`).
fn python_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("python3")?;
            let key = version.split('.').filter_map(|p| p.parse().ok()).collect();
            Some((key, e.path()))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// `root` joined with an absolute path.
fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// The first of [`LIB_NAMES`] present in `dir`.
fn lib_in(dir: &Path) -> Option<PathBuf> {
    LIB_NAMES.iter().map(|name| dir.join(name)).find(|p| p.is_file())
}

/// Decodes `ncclGetVersion`'s integer: `major*10000 + minor*100 + patch` since NCCL 2.9, and
/// `major*1000 + minor*100 + patch` before (codes below 10000).
pub fn decode_nccl_version(code: u32) -> (u32, u32, u32) {
    if code >= 10000 {
        (code / 10000, code / 100 % 100, code % 100)
    } else {
        (code / 1000, code / 100 % 10, code % 100)
    }
}

/// Opens the NCCL library at `path` and asks it its version (`ncclGetVersion`).
pub fn nccl_version(path: &Path) -> Result<(u32, u32, u32), String> {
    type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
    // SAFETY: loading runs the library's initialisers; NCCL's are benign (no global side effects
    // beyond its own state). The path is the caller's choice of an NCCL library.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("cannot load NCCL library {}: {e}", path.display()))?;
    // SAFETY: `ncclGetVersion(int*)` returns `ncclResult_t` (a C enum, int-sized) in every NCCL 2.x.
    let get_version: libloading::Symbol<GetVersion> = unsafe { lib.get(b"ncclGetVersion\0") }
        .map_err(|e| format!("{} does not export ncclGetVersion (is it NCCL?): {e}", path.display()))?;
    let mut code: c_int = 0;
    // SAFETY: the function writes one int through the pointer, which is valid for the call.
    let result = unsafe { get_version(&mut code) };
    if result != 0 {
        return Err(format!(
            "ncclGetVersion in {} failed with ncclResult_t {result}",
            path.display()
        ));
    }
    let code = u32::try_from(code).map_err(|_| format!("ncclGetVersion in {} returned {code}", path.display()))?;
    Ok(decode_nccl_version(code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::fs;

    fn env_of(vars: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        move |name| map.get(name).cloned()
    }

    fn touch(path: &Path) -> PathBuf {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"not really a library").unwrap();
        path.to_path_buf()
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    #[test]
    fn override_file_or_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = touch(&tmp.path().join("custom/libnccl.so.2"));
        let root = tmp.path().join("root");
        // The override wins even when LD_LIBRARY_PATH has one too.
        let other = touch(&tmp.path().join("ld/libnccl.so.2"));
        let env = env_of(&[(OVERRIDE_VAR, s(&lib)), ("LD_LIBRARY_PATH", s(other.parent().unwrap()))]);
        assert_eq!(find_nccl_under(&env, &root).unwrap(), lib);
        let env = env_of(&[(OVERRIDE_VAR, s(lib.parent().unwrap()))]);
        assert_eq!(find_nccl_under(&env, &root).unwrap(), lib);

        let missing = tmp.path().join("nope.so");
        let e = find_nccl_under(
            &env_of(&[
                (OVERRIDE_VAR, s(&missing)),
                ("LD_LIBRARY_PATH", s(other.parent().unwrap())),
            ]),
            &root,
        )
        .unwrap_err();
        assert_eq!(
            e,
            format!(
                "FAST_LLM_NCCL_LIB={} does not exist; point it at the NCCL library (libnccl.so.2) or unset it",
                s(&missing)
            )
        );
        let e = find_nccl_under(&env_of(&[(OVERRIDE_VAR, s(&root))]), &root);
        assert!(e.is_err());
    }

    #[test]
    fn ld_library_path_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let a = tmp.path().join("a");
        fs::create_dir_all(&a).unwrap();
        let b = touch(&tmp.path().join("b/libnccl.so"));
        let c = touch(&tmp.path().join("c/libnccl.so.2"));
        let path = format!("{}::{}:{}", s(&a), s(b.parent().unwrap()), s(c.parent().unwrap()));
        assert_eq!(
            find_nccl_under(&env_of(&[("LD_LIBRARY_PATH", path)]), &root).unwrap(),
            b
        );
        // In one directory the soname wins over the development link.
        let both = touch(&tmp.path().join("b/libnccl.so.2"));
        let path = s(b.parent().unwrap());
        assert_eq!(
            find_nccl_under(&env_of(&[("LD_LIBRARY_PATH", path)]), &root).unwrap(),
            both
        );
    }

    #[test]
    fn pip_wheels_conda_and_system_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let venv = tmp.path().join("venv");
        let home = tmp.path().join("home");
        let conda = tmp.path().join("conda");
        let none: &[(&str, String)] = &[];

        let system = touch(&root.join("usr/local/cuda/lib64/libnccl.so.2"));
        assert_eq!(find_nccl_under(&env_of(none), &root).unwrap(), system);
        let debian = touch(&root.join("usr/lib/python3/dist-packages/nvidia/nccl/lib/libnccl.so.2"));
        assert_eq!(find_nccl_under(&env_of(none), &root).unwrap(), debian);
        let local = touch(&root.join("usr/local/lib/python3.10/dist-packages/nvidia/nccl/lib/libnccl.so.2"));
        assert_eq!(find_nccl_under(&env_of(none), &root).unwrap(), local);
        let conda_lib = touch(&conda.join("lib/libnccl.so"));
        let env = env_of(&[("CONDA_PREFIX", s(&conda)), ("HOME", s(&home))]);
        assert_eq!(
            find_nccl_under(&env, &root).unwrap(),
            local,
            "pip wheels come before $CONDA_PREFIX/lib"
        );
        fs::remove_file(&local).unwrap();
        fs::remove_file(&debian).unwrap();
        assert_eq!(find_nccl_under(&env, &root).unwrap(), conda_lib);
        let user = touch(&home.join(".local/lib/python3.11/site-packages/nvidia/nccl/lib/libnccl.so.2"));
        assert_eq!(find_nccl_under(&env, &root).unwrap(), user);
        touch(&venv.join("lib/python3.9/site-packages/nvidia/nccl/lib/libnccl.so.2"));
        let newest = touch(&venv.join("lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2"));
        let env = env_of(&[
            ("CONDA_PREFIX", s(&conda)),
            ("HOME", s(&home)),
            ("VIRTUAL_ENV", s(&venv)),
        ]);
        assert_eq!(find_nccl_under(&env, &root).unwrap(), newest);
    }

    #[test]
    fn not_found_lists_every_place_and_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let ld = tmp.path().join("ld");
        let env = env_of(&[
            ("LD_LIBRARY_PATH", s(&ld)),
            ("HOME", "/home/u".into()),
            ("VIRTUAL_ENV", "/venv".into()),
        ]);
        let e = find_nccl_under(&env, &root).unwrap_err();
        assert!(
            e.starts_with("NCCL library (libnccl.so.2, libnccl.so) not found; searched: FAST_LLM_NCCL_LIB (unset), "),
            "{e}"
        );
        for place in [
            s(&ld),
            "/venv/lib|lib64/python3*/{site,dist}-packages/nvidia/nccl/lib (none)".into(),
            "/home/u/.local/lib/python3*/{site,dist}-packages/nvidia/nccl/lib (none)".into(),
            format!("{}/lib|lib64/python3*", s(&root.join("usr/local"))),
            s(&root.join("usr/lib/x86_64-linux-gnu")),
            s(&root.join("usr/local/cuda/lib64")),
            s(&root.join("usr/lib64")),
            s(&root.join("usr/local/lib")),
        ] {
            assert!(e.contains(&place), "{place} missing from: {e}");
        }
        assert!(e.ends_with("install it with `pip install nvidia-nccl-cu12` (in the active environment) or set FAST_LLM_NCCL_LIB=/path/to/libnccl.so.2"));
        assert!(!e.contains('\n'));
        let e = find_nccl_under(&env_of(&[]), &root).unwrap_err();
        assert!(e.contains("LD_LIBRARY_PATH (unset)"), "{e}");
    }

    #[test]
    fn version_decoding() {
        assert_eq!(decode_nccl_version(22105), (2, 21, 5));
        assert_eq!(decode_nccl_version(21803), (2, 18, 3));
        assert_eq!(decode_nccl_version(20900), (2, 9, 0));
        assert_eq!(decode_nccl_version(2804), (2, 8, 4));
        assert_eq!(decode_nccl_version(2708), (2, 7, 8));
        assert_eq!(decode_nccl_version(30001), (3, 0, 1));
    }

    #[test]
    fn version_of_non_libraries_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = touch(&tmp.path().join("libnccl.so.2"));
        let e = nccl_version(&fake).unwrap_err();
        assert!(
            e.starts_with(&format!("cannot load NCCL library {}: ", s(&fake))),
            "{e}"
        );
        // A real library without the symbol (glibc's libm is on every Linux/glibc machine).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            let e = nccl_version(Path::new("libm.so.6")).unwrap_err();
            assert!(
                e.starts_with("libm.so.6 does not export ncclGetVersion (is it NCCL?)"),
                "{e}"
            );
        }
    }
}
