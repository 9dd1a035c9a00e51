//! Socket plane: bulk TCP_REPAIR dump and restore.
