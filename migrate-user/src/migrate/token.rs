//! The shared token: read from a file only its owner can read, compared in constant time.
use std::{
    io,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use nix::unistd::geteuid;
use subtle::ConstantTimeEq as _;

use super::MigrateError;

/// A shared secret, compared in constant time.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Reads the token from `path`: its content without the trailing newline. The file must be
    /// ours and closed to group and others, or anyone who can read it can move connections.
    pub fn from_file(path: &Path) -> Result<Self, MigrateError> {
        let error = |source| MigrateError::TokenFile {
            path: path.to_owned(),
            source,
        };
        // Checked on the open file, so the mode seen is the mode of what is read.
        let mut file = std::fs::File::open(path).map_err(error)?;
        let meta = file.metadata().map_err(error)?;
        let mode = meta.permissions().mode() & 0o7777;
        let euid = geteuid().as_raw();
        if mode & 0o077 != 0 || meta.uid() != euid {
            return Err(MigrateError::TokenFileMode {
                path: path.to_owned(),
                mode,
                uid: meta.uid(),
                euid,
            });
        }
        let mut text = String::new();
        io::Read::read_to_string(&mut file, &mut text).map_err(error)?;
        let token = text.trim_end_matches(['\n', '\r']);
        if token.is_empty() {
            return Err(error(io::Error::new(
                io::ErrorKind::InvalidData,
                "the file is empty",
            )));
        }
        Ok(Self(token.to_owned()))
    }

    pub(super) fn as_str(&self) -> &str {
        &self.0
    }

    pub(super) fn matches(&self, offered: &str) -> bool {
        bool::from(self.0.as_bytes().ct_eq(offered.as_bytes()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_open_to_others_are_refused() {
        let path = std::env::temp_dir().join(format!("tcpmig-token-{}", std::process::id()));
        std::fs::write(&path, "secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let error = Token::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("mode 0640"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let token = Token::from_file(&path);
        std::fs::remove_file(&path).unwrap();
        assert!(token.unwrap().matches("secret"));
    }
}
