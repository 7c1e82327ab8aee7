//! CPU backend (stub, being written).
