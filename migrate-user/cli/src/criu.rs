//! `tcpmig criu-hook` (install the action script, run the guard) and the action script itself,
//! `tcpmig-criu-hook`, which CRIU runs without arguments.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::Args;
use tcpmig::criu::{self, Config, GuardSpec, HookEnv};

#[derive(Args)]
pub struct CriuHookArgs {
    /// Install `tcpmig-criu-hook`, for `criu --action-script`: a link to this binary, or with
    /// --settings a script and a CRIU configuration file (`criu.conf`) that selects it.
    #[arg(long, required_unless_present_any = ["guard", "run"])]
    install: bool,
    /// Directory of the hook [default: this binary's directory].
    #[arg(long, value_name = "DIR", requires = "install")]
    dir: Option<PathBuf>,
    /// The hook's settings (KEY=VALUE lines, see README), read by the hook whatever CRIU's
    /// environment; checked now. Writes DIR/criu.conf too: select it with the container
    /// annotation org.criu.config=DIR/criu.conf.
    #[arg(long, value_name = "FILE")]
    settings: Option<PathBuf>,
    /// Run as the action script (what the installed script does).
    #[arg(long, conflicts_with_all = ["install", "guard"])]
    run: bool,
    /// Internal: the guard process a freezing action leaves behind.
    #[arg(long, value_name = "SPEC", hide = true, conflicts_with = "install")]
    guard: Option<String>,
}

pub fn criu_hook(args: CriuHookArgs) -> anyhow::Result<()> {
    if let Some(spec) = args.guard {
        let spec: GuardSpec = serde_json::from_str(&spec).context("parsing the guard spec")?;
        let outcome = criu::guard(&spec)?;
        tracing::info!(name = spec.name, ?outcome, "guard done");
        return Ok(());
    }
    if args.run {
        return run_as_hook(args.settings.as_deref());
    }
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .context("locating the tcpmig binary")?;
    let dir = match args.dir {
        Some(dir) => dir,
        None => exe.parent().context("the binary has no directory")?.into(),
    };
    match args.settings {
        Some(settings) => {
            let installed = criu::install_with_settings(&dir, &exe, &settings)?;
            println!("{}", installed.script.display());
            println!("{}", installed.criu_conf.display());
        }
        None => println!("{}", criu::install(&dir, &exe)?.display()),
    }
    Ok(())
}

/// Whether this process was started as the action script.
pub fn invoked_as_hook() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|argv0| criu::invoked_as_hook(argv0.as_ref()))
}

/// Runs the action CRIU names; a failure exits non-zero, which makes CRIU stop. With
/// TCPMIG_REPORT=FILE (environment or settings file), appends one JSON line per action to FILE.
pub fn run_as_hook(settings: Option<&Path>) -> anyhow::Result<()> {
    let env = HookEnv::from_env()?;
    let context = || format!("tcpmig-criu-hook {}", env.action.name());
    let config = Config::from_env_and(settings).with_context(context)?;
    let report = criu::run_hook(&env, &config).with_context(context)?;
    if let Some(path) = &config.report {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening TCPMIG_REPORT {}", path.display()))?;
        writeln!(file, "{}", serde_json::to_string(&report)?)?;
    }
    Ok(())
}
