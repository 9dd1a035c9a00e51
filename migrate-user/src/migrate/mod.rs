//! Standalone migration: the source and destination state machines and their transport.
