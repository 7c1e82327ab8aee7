//! multi_stage (stub).
