//! What the hook knows about a dump, kept beside CRIU's images: the restore runs on another
//! host, in other processes, and must freeze the same connections.
use std::{
    collections::BTreeSet,
    fs, io,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use serde::{Deserialize, Serialize};

use super::{CriuError, SIDECAR};
use crate::tuple::Tuple;

/// What the hook knows about a dump, kept beside the images so that the restore (on another
/// host) freezes the same connections and knows the mode.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sidecar {
    /// The task had its own network namespace (`--external net[...]`).
    pub external_netns: bool,
    pub services: Vec<SocketAddr>,
    /// (local, remote) of every dumped connection.
    pub tuples: Vec<(SocketAddr, SocketAddr)>,
}

impl Sidecar {
    pub(super) fn tuples(&self) -> Vec<Tuple> {
        self.tuples
            .iter()
            .map(|&(local, remote)| Tuple { local, remote })
            .collect()
    }

    /// The addresses the connections use on this side: the ones to announce.
    pub(super) fn local_addresses(&self) -> BTreeSet<IpAddr> {
        self.services
            .iter()
            .map(SocketAddr::ip)
            .chain(self.tuples.iter().map(|(local, _)| local.ip()))
            .map(|ip| ip.to_canonical())
            .collect()
    }

    /// The sidecar in `image_dir`, `None` when the dump left none (no hook at dump time).
    pub(super) fn read(image_dir: &Path) -> Result<Option<Self>, CriuError> {
        let path = image_dir.join(SIDECAR);
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|source| CriuError::CorruptSidecar { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CriuError::Io {
                step: "reading the connection list the dump left beside the images",
                path,
                source,
            }),
        }
    }

    pub(super) fn write(&self, image_dir: &Path) -> Result<(), CriuError> {
        let path = image_dir.join(SIDECAR);
        let text = serde_json::to_string(self).expect("the sidecar serializes");
        fs::write(&path, text).map_err(|source| CriuError::Io {
            step: "writing the connection list beside the images",
            path,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_lists_local_addresses_once() {
        let sidecar = Sidecar {
            external_netns: false,
            services: vec!["198.18.0.100:80".parse().unwrap()],
            tuples: vec![(
                "[::ffff:198.18.0.100]:80".parse().unwrap(),
                "198.18.0.1:4000".parse().unwrap(),
            )],
        };
        assert_eq!(sidecar.local_addresses().len(), 1);
    }
}
