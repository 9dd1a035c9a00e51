//! CRIU action-script hook: tcpmig replaces CRIU's network lock.
