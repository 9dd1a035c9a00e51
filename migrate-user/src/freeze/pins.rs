//! Where a freeze lives between processes: pins under `/sys/fs/bpf/tcpmig/<name>/` and a small
//! metadata file (netns, interface, attach mode) under `/run/tcpmig/freeze/`.
use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::{
    FreezeError, FreezeInfo,
    attach::{EGRESS_PROGRAM, INGRESS_PROGRAM},
};

pub const PIN_ROOT: &str = "/sys/fs/bpf/tcpmig";
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const INFO_ROOT: &str = "/run/tcpmig/freeze";

pub fn dir(name: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(name)
}

fn info_path(name: &str) -> PathBuf {
    Path::new(INFO_ROOT).join(format!("{name}.json"))
}

/// Mounts bpffs at /sys/fs/bpf when it is not (fresh machines here do not mount it).
pub fn ensure_bpffs() -> io::Result<()> {
    use nix::{
        mount::{MsFlags, mount},
        sys::statfs::{BPF_FS_MAGIC, statfs},
    };
    if statfs(BPFFS_MOUNT).is_ok_and(|stat| stat.filesystem_type() == BPF_FS_MAGIC) {
        return Ok(());
    }
    mount(
        Some("bpf"),
        BPFFS_MOUNT,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

pub(super) fn io_error(name: &str, what: &'static str) -> impl FnOnce(io::Error) -> FreezeError {
    let name = name.to_owned();
    move |source| FreezeError::Io { name, what, source }
}

/// A freshly created pin directory, removed with its contents unless [`PinDir::keep`] is called:
/// a failed attach leaves nothing pinned.
pub struct PinDir {
    name: String,
    path: PathBuf,
    armed: bool,
}

impl PinDir {
    pub fn create(name: &str) -> Result<Self, FreezeError> {
        let path = dir(name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(io_error(name, "creating the pin directory"))?;
        // The mode above applies only to directories created now: narrow older ones too.
        for dir in [Path::new(PIN_ROOT), &path] {
            root_only(dir).map_err(io_error(name, "making the pin directory root-only"))?;
        }
        Ok(Self {
            name: name.to_owned(),
            path,
            armed: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.armed
            && let Err(error) = remove_all(&self.name)
        {
            tracing::warn!(name = %self.name, %error, "cleaning up a failed attach");
        }
    }
}

/// Pins give whoever can open them the programs and maps (CAP_BPF still needed to use them):
/// only their owner may look into the directories.
fn root_only(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o7700))?;
    }
    Ok(())
}

pub fn links_present(name: &str) -> bool {
    let dir = dir(name);
    dir.join(INGRESS_PROGRAM).exists() && dir.join(EGRESS_PROGRAM).exists()
}

pub fn read_info(name: &str) -> Result<Option<FreezeInfo>, FreezeError> {
    let path = info_path(name);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(name, "reading metadata")(e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| FreezeError::Metadata {
            name: name.to_owned(),
            path,
            source,
        })
}

pub fn write_info(info: &FreezeInfo) -> Result<(), FreezeError> {
    let error = || io_error(&info.name, "writing metadata");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(INFO_ROOT)
        .and_then(|()| root_only(Path::new(INFO_ROOT)))
        .map_err(error())?;
    let text = serde_json::to_string(info).expect("metadata serializes");
    let path = info_path(&info.name);
    let tmp = path.with_extension("json.tmp");
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| io::Write::write_all(&mut file, text.as_bytes()))
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(error())
}

pub fn list_names() -> Result<Vec<String>, FreezeError> {
    let mut names = Vec::new();
    for root in [PIN_ROOT, INFO_ROOT] {
        let entries = match fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("*", "listing freezes")(e)),
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let name = file_name
                .strip_suffix(".json")
                .unwrap_or(&file_name)
                .to_owned();
            if !name.ends_with(".tmp") && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Removes the pins (which detaches tcx links nobody else holds) and the metadata.
pub fn remove_all(name: &str) -> Result<(), FreezeError> {
    match fs::remove_dir_all(dir(name)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(name, "removing pins")(e)),
    }
    match fs::remove_file(info_path(name)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(name, "removing metadata")(e)),
    }
}
