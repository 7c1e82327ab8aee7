//! Comm stream (stub).
