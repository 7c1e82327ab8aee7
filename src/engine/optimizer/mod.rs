//! optimizer (stub).
