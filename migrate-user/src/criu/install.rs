//! Installing the action script: a link named `tcpmig-criu-hook` to the binary, or, with a
//! settings file, a script that runs the hook with that file and a CRIU configuration file
//! that selects it. Container runtimes pass CRIU a configuration file (runc and podman: the
//! annotation `org.criu.config`, or /etc/criu/runc.conf) but not always an environment
//! (podman passes none), so the script carries the settings' path itself.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use super::{Config, CriuError, HOOK_NAME};

/// The first line after the shebang of every script `install_with_settings` writes: how it
/// knows one it may replace.
const SCRIPT_MARK: &str = "# Written by `tcpmig criu-hook --install`";
/// CRIU's configuration file, beside the script.
const CRIU_CONF: &str = "criu.conf";

/// What `install_with_settings` wrote.
#[derive(Debug)]
pub struct Installed {
    /// The action script.
    pub script: PathBuf,
    /// CRIU's options selecting it (`action-script`, `network-lock skip`, `tcp-established`).
    pub criu_conf: PathBuf,
}

/// Makes `dir/tcpmig-criu-hook` a link to `exe` (replacing an older link there); returns its path.
pub fn install(dir: &Path, exe: &Path) -> Result<PathBuf, CriuError> {
    let link = dir.join(HOOK_NAME);
    make_room(&link)?;
    std::os::unix::fs::symlink(exe, &link).map_err(io_error("creating the link", &link))?;
    Ok(link)
}

/// Writes `dir/tcpmig-criu-hook`, a script running `exe`'s hook with the settings of
/// `settings` whatever CRIU's environment (TCPMIG_* variables, where a runtime passes them,
/// still override the file's), and `dir/criu.conf`. `settings` is read and checked first: a
/// missing or wrong file is an error here, not at the first checkpoint.
pub fn install_with_settings(
    dir: &Path,
    exe: &Path,
    settings: &Path,
) -> Result<Installed, CriuError> {
    let text = fs::read_to_string(settings).map_err(io_error("reading the settings", settings))?;
    Config::parse(Some(&text), [])?;
    let settings =
        fs::canonicalize(settings).map_err(io_error("locating the settings", settings))?;
    let script = dir.join(HOOK_NAME);
    if script
        .to_str()
        .is_none_or(|path| path.contains(char::is_whitespace))
    {
        return Err(CriuError::UnusablePath { path: script });
    }
    make_room(&script)?;
    let body = format!(
        "#!/bin/sh\n{SCRIPT_MARK}: CRIU's action script, the tcpmig hook with the settings \
         below.\nexec {} criu-hook --run --settings {}\n",
        quoted(exe),
        quoted(&settings),
    );
    write_mode(&script, &body, 0o755)?;
    let criu_conf = dir.join(CRIU_CONF);
    let conf = format!(
        "{SCRIPT_MARK}. Select it with the annotation\n# org.criu.config={}, or copy it to \
         /etc/criu/runc.conf for every container. tcp-established: the Kubernetes runtimes do \
         not pass it.\naction-script {}\nnetwork-lock skip\ntcp-established\n",
        criu_conf.display(),
        script.display(),
    );
    write_mode(&criu_conf, &conf, 0o644)?;
    Ok(Installed { script, criu_conf })
}

/// Removes an older link or script of ours at `path`, and makes its directory.
fn make_room(path: &Path) -> Result<(), CriuError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() || is_our_script(path) => {
            fs::remove_file(path).map_err(io_error("replacing the old hook", path))?;
        }
        Ok(_) => return Err(CriuError::NotALink { path: path.into() }),
        Err(_) => {}
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_error("creating the directory", dir))
}

fn is_our_script(path: &Path) -> bool {
    fs::read_to_string(path).is_ok_and(|text| {
        text.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(SCRIPT_MARK))
    })
}

fn write_mode(path: &Path, text: &str, mode: u32) -> Result<(), CriuError> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text).map_err(io_error("writing", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_error("setting the mode of", path))
}

/// `path` in single quotes for sh, a quote inside written `'\''`.
fn quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

fn io_error(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CriuError {
    let path = path.to_owned();
    move |source| CriuError::Io { step, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_survive_the_shell() {
        assert_eq!(quoted(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }
}
