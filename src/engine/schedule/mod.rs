//! schedule (stub).
