//! The image on the link: each application process's part of it, encoded in its shard, and the
//! pieces it is sent in (the pre-copy's and the dump's alike).
use bytes::Bytes;

use crate::{
    image::{self, Image},
    migrate::{
        MigrateError, test_pause,
        transport::{IMAGE_PIECE, Link},
    },
    repair::Connection,
};

/// One process's part of the image, and what its connections carry.
pub(super) struct Part {
    records: Bytes,
    pub(super) connections: usize,
    pub(super) send_bytes: u64,
    pub(super) unsent_bytes: u64,
    pub(super) recv_bytes: u64,
}

impl Part {
    pub(super) fn of(connections: &[Connection]) -> Self {
        let sum = |f: fn(&Connection) -> usize| connections.iter().map(|c| f(c) as u64).sum();
        Self {
            records: image::records(connections),
            connections: connections.len(),
            send_bytes: sum(|c| c.send_queue.len()),
            unsent_bytes: sum(|c| c.unsent as usize),
            recv_bytes: sum(|c| c.recv_queue.len()),
        }
    }
}

/// Sends the image of `parts` in pieces; returns its connections and bytes. `pause` names the
/// test pause after the first piece.
pub(super) async fn send_image(
    link: &mut Link,
    parts: &[Part],
    pause: Option<&str>,
) -> Result<(usize, usize), MigrateError> {
    let connections: usize = parts.iter().map(|p| p.connections).sum();
    let mut pieces = vec![Image::header()];
    pieces.extend(parts.iter().map(|p| p.records.clone()));
    pieces.push(Image::end(connections));
    let image_bytes = pieces.iter().map(Bytes::len).sum();
    for (i, chunk) in pieces
        .iter()
        .flat_map(|p| p.chunks(IMAGE_PIECE))
        .enumerate()
    {
        if i == 1
            && let Some(pause) = pause
        {
            test_pause(pause);
        }
        link.send_image(chunk).await?;
    }
    Ok((connections, image_bytes))
}
