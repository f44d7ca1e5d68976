//! What `sluice run` will need from this machine and can be known without starting anything:
//! each `process` function's program exists and is executable, and the `sqlite://` state
//! directory can be written. `sluice validate` runs these after loading, so a typo in
//! `command` is found before the first event arrives rather than at the first invocation.
//!
//! The command is resolved as the runner resolves it (broker/src/runtime/process.rs
//! `resolve_program`): an absolute path as it is; a path with a `/` relative to the package
//! (inside the zip listing for a `.zip` package, which is unpacked only at run); a bare name
//! on the function's `PATH`, never Sluice's own. Loading stays pure: nothing here is called
//! by [`crate::load_file`].

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::{Config, ConfigError, FunctionConfig, Runtime};

/// The `PATH` a function's program gets, and so where a bare command name is looked up.
pub const FUNCTION_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where a bare program name is found on the function's `PATH`, as the runner looks it up.
pub fn on_function_path(program: &str) -> Option<PathBuf> {
    FUNCTION_PATH
        .split(':')
        .map(|dir| PathBuf::from(dir).join(program))
        .find(|candidate| candidate.is_file())
}

/// Every problem of this kind in `config`, in file order. A package that is missing or is not
/// a directory or a zip is left to the package checks, which report it.
pub fn check_host(config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (name, function) in &config.functions {
        if let Some(message) = command_problem(function) {
            errors.push(config.error_at(&command_path(config, name), message));
        }
    }
    if let Some(message) = state_problem(config) {
        errors.push(config.error_at("state", message));
    }
    crate::sort_errors(&mut errors);
    errors
}

/// Where an error about the command goes: its program word, the `command` string, or the
/// package when the command is the default.
fn command_path(config: &Config, name: &str) -> String {
    let base = format!("functions.{name}");
    [
        format!("{base}.command[0]"),
        format!("{base}.command"),
        format!("{base}.package"),
    ]
    .into_iter()
    .find(|path| config.location(path).is_some())
    .unwrap_or(base)
}

fn command_problem(function: &FunctionConfig) -> Option<String> {
    if function.runtime != Runtime::Process {
        return None;
    }
    let package = function.package.as_deref()?;
    let program = function.command.as_deref()?.first()?;
    let path = Path::new(program);
    if path.is_absolute() {
        return host_file_problem(program, path);
    }
    if program.contains('/') {
        let meta = std::fs::metadata(package).ok()?;
        if meta.is_dir() {
            let in_root = package.join(without_dots(path));
            return match std::fs::metadata(&in_root) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Some(format!(
                    "command `{program}` is not in the package {}",
                    package.display()
                )),
                _ => host_file_problem(program, &in_root),
            };
        }
        let is_zip = package
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("zip"));
        return if is_zip {
            zip_problem(program, package)
        } else {
            None
        };
    }
    if let Some(candidate) = on_function_path(program) {
        return host_file_problem(program, &candidate);
    }
    Some(format!(
        "command `{program}` is not on the function's PATH ({FUNCTION_PATH}); to run a file of the package, write `./{program}`"
    ))
}

/// A program on this machine: it must be a file with an execute bit.
fn host_file_problem(program: &str, path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::metadata(path) {
        Err(e) => Some(format!(
            "command `{program}`: cannot use {}: {e}",
            path.display()
        )),
        Ok(meta) if !meta.is_file() => Some(format!(
            "command `{program}`: {} is not a file",
            path.display()
        )),
        Ok(meta) if meta.permissions().mode() & 0o111 == 0 => Some(format!(
            "command `{program}`: {} is not executable (chmod +x it)",
            path.display()
        )),
        Ok(_) => None,
    }
}

/// A program inside a zip package, judged from the archive's listing: the entry must exist and
/// carry an execute bit, which unpacking keeps (an entry without Unix permissions unpacks
/// without one).
fn zip_problem(program: &str, package: &Path) -> Option<String> {
    // An unreadable archive is reported by the package checks.
    let file = std::fs::File::open(package).ok()?;
    let mut archive = zip::ZipArchive::new(file).ok()?;
    let Some(entry) = normalize(program) else {
        return Some(format!(
            "command `{program}` leaves the zip package {}: name a file inside it",
            package.display()
        ));
    };
    let is_dir = |archive: &zip::ZipArchive<std::fs::File>| {
        archive.index_for_name(&format!("{entry}/")).is_some()
    };
    let Some(index) = archive.index_for_name(&entry) else {
        let what = if is_dir(&archive) {
            "is a directory in"
        } else {
            "is not in"
        };
        return Some(format!(
            "command `{program}` {what} the zip package {}",
            package.display()
        ));
    };
    let mode = match archive.by_index_raw(index) {
        Ok(found) if found.is_dir() => {
            return Some(format!(
                "command `{program}` is a directory in the zip package {}",
                package.display()
            ));
        }
        Ok(found) => found.unix_mode(),
        Err(_) => return None,
    };
    match mode {
        Some(mode) if mode & 0o111 != 0 => None,
        _ => Some(format!(
            "command `{program}` is not executable in the zip package {}: zip it with its execute permission (`chmod +x` before zipping, on a system that records Unix permissions)",
            package.display()
        )),
    }
}

/// `path` without its `.` components, which change nothing but how it reads in a message.
fn without_dots(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}

/// The zip entry name of a relative program path (`./bin/run` → `bin/run`); `None` when it
/// climbs out of the package.
fn normalize(program: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for component in Path::new(program).components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

/// The `sqlite://` state file's directory must exist or be creatable, and be writable: the
/// runner creates it, keeps the database there and unpacks zip packages beside it.
fn state_problem(config: &Config) -> Option<String> {
    let path = config.state.strip_prefix("sqlite://")?;
    let path = config.base_dir.join(without_dots(Path::new(path)));
    let dir = path.parent()?;
    // The nearest directory that exists: the runner creates the rest under it.
    let mut existing = dir;
    loop {
        match std::fs::metadata(existing) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                return Some(format!(
                    "the state directory {} cannot be created: {} is not a directory",
                    dir.display(),
                    existing.display()
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => existing = existing.parent()?,
            Err(e) => {
                return Some(format!(
                    "the state directory {} cannot be used: {}: {e}",
                    dir.display(),
                    existing.display()
                ));
            }
        }
    }
    // Permission bits do not tell (root, ACLs, a read-only mount): creating a file does.
    if let Err(e) = tempfile::Builder::new()
        .prefix(".sluice-validate-")
        .tempfile_in(existing)
    {
        let what = if existing == dir {
            format!("the state directory {} is not writable", dir.display())
        } else {
            format!(
                "the state directory {} cannot be created: {} is not writable",
                dir.display(),
                existing.display()
            )
        };
        return Some(format!("{what}: {e}"));
    }
    if let Ok(meta) = std::fs::metadata(&path) {
        if meta.is_dir() {
            return Some(format!("the state file {} is a directory", path.display()));
        }
        if let Err(e) = std::fs::OpenOptions::new().write(true).open(&path) {
            return Some(format!(
                "the state file {} is not writable: {e}",
                path.display()
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_programs_name_their_zip_entry() {
        assert_eq!(normalize("./bootstrap").as_deref(), Some("bootstrap"));
        assert_eq!(normalize("bin/../run").as_deref(), Some("run"));
        assert_eq!(normalize("./a/./b").as_deref(), Some("a/b"));
        assert_eq!(normalize("../outside"), None);
        assert_eq!(normalize("./"), None);
    }
}
