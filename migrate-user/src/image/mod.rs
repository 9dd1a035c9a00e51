//! The image: one versioned, checksummed stream for all connections.
