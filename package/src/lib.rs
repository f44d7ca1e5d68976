//! Function packages: a directory, or a `.zip` unpacked into the data directory, both held to
//! Lambda's size limits and treated as hostile input.
//!
//! A package is walked without ever following a link: its size is the sum of the bytes its
//! regular files hold (for a zip, the bytes actually written, not what the central directory
//! declares), sums use checked arithmetic, a link may point only inside the package, and
//! FIFOs, sockets and devices are refused (reading one would hang or never end). A zip is
//! unpacked once per content into `packages/<sha256>` and reused by later starts; an
//! extraction that fails leaves nothing behind.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// The longest link target a zip entry may declare (Linux's PATH_MAX).
const MAX_LINK_TARGET: u64 = 4096;
/// Temporary extraction directories start with this, followed by the owner's pid.
const PARTIAL_PREFIX: &str = ".partial-";

#[derive(Debug, Error)]
pub enum PackageError {
    #[error("package {path} does not exist")]
    Missing { path: PathBuf },
    #[error("package {path} is {kind}, neither a directory nor a .zip file")]
    NotAPackage { path: PathBuf, kind: &'static str },
    #[error(
        "package {path} is {size} bytes zipped, over the limit of {limit} bytes (limits.package_zipped)"
    )]
    ZippedTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error(
        "package {path} is more than {limit} bytes unpacked, over the limit (limits.package_unpacked)"
    )]
    UnpackedTooLarge { path: PathBuf, limit: u64 },
    #[error(
        "package {path}: link {link} points to {target}, outside the package (a link may only point inside the package)"
    )]
    LinkLeavesPackage {
        path: PathBuf,
        link: PathBuf,
        target: PathBuf,
    },
    #[error("package {path}: {entry} is {kind}; a package holds only files, directories and links")]
    SpecialFile {
        path: PathBuf,
        entry: PathBuf,
        kind: &'static str,
    },
    #[error("package {path}: entry `{name}` {why}")]
    BadEntry {
        path: PathBuf,
        name: String,
        why: &'static str,
    },
    #[error("cannot read package {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unpack {path}: {source}")]
    Zip {
        path: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct SizeLimits {
    pub zipped: u64,
    pub unpacked: u64,
}

/// One entry of a package tree, as found on disk; links are described, never followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File { mode: u32, len: u64 },
    Link { mode: u32, target: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path relative to the package root.
    pub rel: PathBuf,
    pub kind: EntryKind,
}

/// Lists the tree under `root` (which must be canonical) without following links, checking
/// it as a package: regular files summing to at most `limit` bytes, links that resolve inside
/// `root`, nothing else. `package` names the package in errors.
pub fn walk(root: &Path, package: &Path, limit: u64) -> Result<Vec<Entry>, PackageError> {
    let io_err = |source| PackageError::Io {
        path: package.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    let mut total = 0u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&dir)).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let rel = dir.join(entry.file_name());
            // DirEntry::metadata is lstat: a link is seen as a link.
            let meta = entry.metadata().map_err(io_err)?;
            let kind = meta.file_type();
            if kind.is_dir() {
                stack.push(rel.clone());
                entries.push(Entry {
                    rel,
                    kind: EntryKind::Dir,
                });
            } else if kind.is_file() {
                total = total
                    .checked_add(meta.len())
                    .filter(|t| *t <= limit)
                    .ok_or_else(|| PackageError::UnpackedTooLarge {
                        path: package.to_path_buf(),
                        limit,
                    })?;
                entries.push(Entry {
                    rel,
                    kind: EntryKind::File {
                        mode: meta.permissions().mode(),
                        len: meta.len(),
                    },
                });
            } else if kind.is_symlink() {
                let target = std::fs::read_link(entry.path()).map_err(io_err)?;
                check_link(root, &rel, &target, package)?;
                entries.push(Entry {
                    rel,
                    kind: EntryKind::Link {
                        mode: meta.permissions().mode(),
                        target,
                    },
                });
            } else {
                return Err(PackageError::SpecialFile {
                    path: package.to_path_buf(),
                    entry: rel,
                    kind: special_kind(&kind),
                });
            }
        }
    }
    Ok(entries)
}

/// A link is kept only when what it finally resolves to lies inside the package. Resolving on
/// the real tree (rather than by the link's text) also catches a chain of links, or a `..`
/// after a link to a directory, that leads out. A dangling link is refused too: what it names
/// could appear outside the package later.
fn check_link(root: &Path, rel: &Path, target: &Path, package: &Path) -> Result<(), PackageError> {
    let inside = std::fs::canonicalize(root.join(rel)).is_ok_and(|real| real.starts_with(root));
    if inside {
        Ok(())
    } else {
        Err(PackageError::LinkLeavesPackage {
            path: package.to_path_buf(),
            link: rel.to_path_buf(),
            target: target.to_path_buf(),
        })
    }
}

fn special_kind(kind: &std::fs::FileType) -> &'static str {
    if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

/// Returns the directory the function runs in, unpacking a zip under `unpack_root` if needed
/// (or reusing the copy an earlier start unpacked from the same bytes).
pub fn prepare(
    package: &Path,
    limits: SizeLimits,
    unpack_root: &Path,
) -> Result<PathBuf, PackageError> {
    let io_err = |source| PackageError::Io {
        path: package.to_path_buf(),
        source,
    };
    // stat, not open: opening a FIFO or a device could block or have side effects.
    let meta = match std::fs::metadata(package) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(PackageError::Missing {
                path: package.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err(e)),
    };
    if meta.is_dir() {
        let root = std::fs::canonicalize(package).map_err(io_err)?;
        walk(&root, package, limits.unpacked)?;
        return Ok(root);
    }
    if !meta.is_file() {
        return Err(PackageError::NotAPackage {
            path: package.to_path_buf(),
            kind: special_kind(&meta.file_type()),
        });
    }
    let is_zip = package
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"));
    if !is_zip {
        return Err(PackageError::NotAPackage {
            path: package.to_path_buf(),
            kind: "a file",
        });
    }
    if meta.len() > limits.zipped {
        return Err(PackageError::ZippedTooLarge {
            path: package.to_path_buf(),
            size: meta.len(),
            limit: limits.zipped,
        });
    }
    // O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening it must not hang.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(package)
        .map_err(io_err)?;
    if !file.metadata().map_err(io_err)?.is_file() {
        return Err(PackageError::NotAPackage {
            path: package.to_path_buf(),
            kind: "not a regular file",
        });
    }
    let digest = sha256_hex(&mut file, limits.zipped).map_err(io_err)?;
    std::fs::create_dir_all(unpack_root).map_err(io_err)?;
    remove_stale_partials(unpack_root);
    let target = unpack_root.join(&digest);
    if target.is_dir() {
        return Ok(target);
    }
    let partial = tempfile::Builder::new()
        .prefix(&format!("{PARTIAL_PREFIX}{}-", std::process::id()))
        .tempdir_in(unpack_root)
        .map_err(io_err)?;
    let dir = std::fs::canonicalize(partial.path()).map_err(io_err)?;
    unzip(file, package, &dir, limits.unpacked)?;
    seal(&dir).map_err(io_err)?;
    // From here the guard cannot remove the sealed tree itself: remove_tree does.
    let _ = partial.keep();
    match std::fs::rename(&dir, &target) {
        Ok(()) => Ok(target),
        // Another start unpacked the same bytes first.
        Err(_) if target.is_dir() => {
            remove_tree(&dir);
            Ok(target)
        }
        Err(e) => {
            remove_tree(&dir);
            Err(io_err(e))
        }
    }
}

/// Takes the write bits off every file and directory of a tree Sluice made (an unpacked zip,
/// a published version's copy), children before their directory. Where functions run without
/// a mount namespace (Sluice not root), these modes are what keeps the task root read-only.
fn seal(root: &Path) -> io::Result<()> {
    let mut dirs = vec![root.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        for entry in std::fs::read_dir(&dirs[i])? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if meta.is_file() {
                let mode = meta.permissions().mode() & 0o7555;
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
            }
        }
        i += 1;
    }
    // Deepest first, so no directory is sealed before what it holds.
    for dir in dirs.iter().rev() {
        let mode = std::fs::symlink_metadata(dir)?.permissions().mode() & 0o7555;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Removes a tree, sealed or not: its directories get their owner's write bit back first
/// (without it, a process that is not root cannot empty them).
pub fn remove_tree(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let _ = std::fs::set_permissions(
            &dir,
            std::fs::Permissions::from_mode(meta.permissions().mode() | 0o700),
        );
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    if let Err(e) = std::fs::remove_dir_all(root)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %root.display(), error = %e, "cannot remove a package copy");
    }
}

/// Removes the zips unpacked under `unpack_root` by earlier starts that no function of this
/// configuration runs any more (published versions have copies of their own elsewhere).
pub fn remove_unused(unpack_root: &Path, in_use: &[&Path]) {
    let Ok(entries) = std::fs::read_dir(unpack_root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_copy = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()));
        if is_copy && !in_use.contains(&path.as_path()) {
            remove_tree(&path);
        }
    }
}

/// The hex SHA-256 of a zip, read once and no further than `limit` bytes.
fn sha256_hex(file: &mut File, limit: u64) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    io::copy(&mut file.take(limit), &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Removes extraction directories left by a Sluice that crashed while unpacking.
fn remove_stale_partials(unpack_root: &Path) {
    remove_orphans(unpack_root, PARTIAL_PREFIX, remove_tree);
}

/// Unpacks `file` into the empty directory `dir`, counting the bytes actually written against
/// `limit`. Links are made last, after every file and directory, so that no entry is ever
/// written through a link; then the whole tree is checked as a package.
fn unzip(file: File, package: &Path, dir: &Path, limit: u64) -> Result<(), PackageError> {
    let zip_err = |source| PackageError::Zip {
        path: package.to_path_buf(),
        source,
    };
    let io_err = |source| PackageError::Io {
        path: package.to_path_buf(),
        source,
    };
    let too_large = || PackageError::UnpackedTooLarge {
        path: package.to_path_buf(),
        limit,
    };
    let mut archive = zip::ZipArchive::new(file).map_err(zip_err)?;
    // What the central directory declares is only a first, cheap refusal; the bytes written
    // are what count.
    let mut declared = 0u64;
    for i in 0..archive.len() {
        let size = archive.by_index_raw(i).map_err(zip_err)?.size();
        declared = declared
            .checked_add(size)
            .filter(|d| *d <= limit)
            .ok_or_else(too_large)?;
    }
    let mut budget = limit;
    let mut links = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(zip_err)?;
        let bad = |why| PackageError::BadEntry {
            path: package.to_path_buf(),
            name: entry.name().to_string(),
            why,
        };
        let Some(rel) = entry.enclosed_name() else {
            return Err(bad("leaves the package (absolute or `..` path)"));
        };
        if entry.is_symlink() {
            let mut target = Vec::new();
            (&mut entry)
                .take(MAX_LINK_TARGET + 1)
                .read_to_end(&mut target)
                .map_err(io_err)?;
            if target.len() as u64 > MAX_LINK_TARGET || target.is_empty() {
                return Err(PackageError::BadEntry {
                    path: package.to_path_buf(),
                    name: entry.name().to_string(),
                    why: "is a link with an empty or over-long target",
                });
            }
            links.push((rel, PathBuf::from(OsString::from_vec(target))));
            continue;
        }
        let path = dir.join(&rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&path).map_err(io_err)?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err)?;
        }
        // Set-id and sticky bits are dropped; the rest of the mode (the executable bit of
        // `bootstrap`) is kept.
        let mode = entry.unix_mode().map_or(0o644, |m| m & 0o777);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        let written =
            io::copy(&mut (&mut entry).take(budget.saturating_add(1)), &mut out).map_err(io_err)?;
        if written > budget {
            return Err(too_large());
        }
        budget -= written;
        out.flush().map_err(io_err)?;
        out.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err)?;
    }
    for (rel, target) in links {
        make_dirs_without_links(dir, rel.parent().unwrap_or(Path::new(""))).map_err(io_err)?;
        std::os::unix::fs::symlink(&target, dir.join(&rel)).map_err(io_err)?;
    }
    walk(dir, package, limit)?;
    Ok(())
}

/// Creates `rel` under `root` one component at a time, refusing to pass through a link (an
/// earlier entry could have been a link named like a directory of a later one).
fn make_dirs_without_links(root: &Path, rel: &Path) -> io::Result<()> {
    let mut at = root.to_path_buf();
    for component in rel.components() {
        let Component::Normal(name) = component else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unexpected path component",
            ));
        };
        at.push(name);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not a directory", at.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&at)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Lambda's CodeSha256: base64 of a SHA-256 of the package tree (paths, modes and contents in
/// path order; a link's target text instead of contents), so the same code gives the same
/// hash wherever it was unpacked. Write bits are left out: Sluice's own copies have none
/// (see `seal`), and they say nothing about the code. Links are never followed and every file is read through a
/// descriptor that refuses to follow one or to block.
pub fn tree_sha256(root: &Path, limit: u64) -> Result<String, PackageError> {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let io_err = |source| PackageError::Io {
        path: root.to_path_buf(),
        source,
    };
    let root = std::fs::canonicalize(root).map_err(io_err)?;
    let mut entries: Vec<Entry> = walk(&root, &root, limit)?
        .into_iter()
        .filter(|e| e.kind != EntryKind::Dir)
        .collect();
    entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    let mut hasher = Sha256::new();
    for entry in entries {
        hasher.update(entry.rel.as_os_str().as_encoded_bytes());
        match entry.kind {
            EntryKind::File { mode, len } => {
                hasher.update((mode & !0o222).to_le_bytes());
                let file = open_regular(&root.join(&entry.rel)).map_err(io_err)?;
                // Read no more than was counted against the limit, even if the file grew.
                let copied = io::copy(&mut file.take(len), &mut hasher).map_err(io_err)?;
                if copied != len {
                    return Err(io_err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} changed while it was read", entry.rel.display()),
                    )));
                }
            }
            EntryKind::Link { mode, target } => {
                hasher.update((mode & !0o222).to_le_bytes());
                hasher.update(target.as_os_str().as_encoded_bytes());
            }
            EntryKind::Dir => {}
        }
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(hasher.finalize()))
}

/// Copies a package tree from `src` to the new directory `dst`: links are copied as links,
/// files through descriptors that refuse to follow a link or block on a FIFO.
pub fn copy_tree(src: &Path, dst: &Path, limit: u64) -> Result<(), PackageError> {
    let io_err = |source| PackageError::Io {
        path: src.to_path_buf(),
        source,
    };
    let root = std::fs::canonicalize(src).map_err(io_err)?;
    let entries = walk(&root, &root, limit)?;
    std::fs::create_dir_all(dst).map_err(io_err)?;
    // Parents before children: walk lists a directory before what it holds.
    for entry in entries {
        let to = dst.join(&entry.rel);
        match entry.kind {
            EntryKind::Dir => std::fs::create_dir(&to).map_err(io_err)?,
            EntryKind::File { mode, len } => {
                let from = open_regular(&root.join(&entry.rel)).map_err(io_err)?;
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&to)
                    .map_err(io_err)?;
                io::copy(&mut from.take(len), &mut out).map_err(io_err)?;
                out.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
                    .map_err(io_err)?;
            }
            EntryKind::Link { target, .. } => {
                std::os::unix::fs::symlink(&target, &to).map_err(io_err)?
            }
        }
    }
    seal(dst).map_err(io_err)
}

/// Opens a file for reading only if it is still a regular file and not a link.
fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is no longer a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Removes what a Sluice that is gone left in `dir` (a crash or `kill -9` gives it no chance
/// to clean up): the entries named `<prefix><pid>-…` whose process no longer runs, with
/// `remove`. Entries of running Sluices, and names that do not fit, are left alone.
pub fn remove_orphans(dir: &Path, prefix: &str, remove: impl Fn(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let owner = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            remove(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const ROOMY: SizeLimits = SizeLimits {
        zipped: 50_000_000,
        unpacked: 250_000_000,
    };

    fn zip_with(files: &[(&str, &[u8], u32)]) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new()
            .suffix(".zip")
            .tempfile()
            .expect("temp zip");
        let mut writer = zip::ZipWriter::new(file.reopen().expect("reopen"));
        for (name, data, mode) in files {
            let options = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
            writer.start_file(*name, options).expect("start");
            writer.write_all(data).expect("write");
        }
        writer.finish().expect("finish");
        file
    }

    fn zip_with_link(files: &[(&str, &[u8])], links: &[(&str, &str)]) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new()
            .suffix(".zip")
            .tempfile()
            .expect("temp zip");
        let mut writer = zip::ZipWriter::new(file.reopen().expect("reopen"));
        for (name, data) in files {
            writer
                .start_file(*name, zip::write::SimpleFileOptions::default())
                .expect("start");
            writer.write_all(data).expect("write");
        }
        for (name, target) in links {
            writer
                .add_symlink(*name, *target, zip::write::SimpleFileOptions::default())
                .expect("link");
        }
        writer.finish().expect("finish");
        file
    }

    fn entries_of(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn unpacks_a_zip_keeping_the_executable_bit() {
        let zip = zip_with(&[
            ("bootstrap", b"#!/bin/sh\n", 0o755),
            ("data.txt", b"x", 0o644),
        ]);
        let root = tempfile::tempdir().expect("root");
        let dir = prepare(zip.path(), ROOMY, root.path()).expect("prepared");
        let mode = std::fs::metadata(dir.join("bootstrap"))
            .expect("bootstrap")
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "bootstrap must stay executable");
        assert_eq!(std::fs::read(dir.join("data.txt")).expect("data"), b"x");
    }

    #[test]
    fn refuses_a_zip_over_the_unpacked_limit_before_unpacking() {
        let zip = zip_with(&[("big", &[0u8; 4096], 0o644)]);
        let root = tempfile::tempdir().expect("root");
        let limits = SizeLimits {
            zipped: 50_000_000,
            unpacked: 1000,
        };
        let err = prepare(zip.path(), limits, root.path()).expect_err("too large");
        assert!(
            matches!(err, PackageError::UnpackedTooLarge { limit: 1000, .. }),
            "{err}"
        );
        assert_eq!(entries_of(root.path()), Vec::<String>::new());
    }

    /// Rewrites the uncompressed size of every entry in a zip written by `zip_with`, in both
    /// the local headers and the central directory, as a hostile archive would declare it.
    fn lie_about_sizes(zip: &Path, declared: u32) {
        let mut bytes = std::fs::read(zip).expect("zip bytes");
        let mut i = 0;
        while i + 4 <= bytes.len() {
            match &bytes[i..i + 4] {
                b"PK\x03\x04" => {
                    bytes[i + 22..i + 26].copy_from_slice(&declared.to_le_bytes());
                    i += 30;
                }
                b"PK\x01\x02" => {
                    bytes[i + 24..i + 28].copy_from_slice(&declared.to_le_bytes());
                    i += 46;
                }
                _ => i += 1,
            }
        }
        std::fs::write(zip, bytes).expect("rewrite");
    }

    #[test]
    fn counts_the_bytes_a_zip_inflates_to_not_what_it_declares() {
        // 8 MB of zeros deflate to a few kilobytes; the archive claims 1,000 bytes.
        let zip = zip_with(&[("bomb", &vec![0u8; 8_000_000], 0o644)]);
        lie_about_sizes(zip.path(), 1000);
        let root = tempfile::tempdir().expect("root");
        let limits = SizeLimits {
            zipped: 50_000_000,
            unpacked: 1_000_000,
        };
        let err = prepare(zip.path(), limits, root.path()).expect_err("a bomb");
        assert!(
            matches!(
                &err,
                PackageError::UnpackedTooLarge {
                    limit: 1_000_000,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            entries_of(root.path()),
            Vec::<String>::new(),
            "a failed extraction leaves nothing behind"
        );
    }

    /// A zip of stored entries `(name, data, declared uncompressed size, is a link)`, each
    /// declaring its size through a zip64 extra field, as a hostile archive can.
    fn zip64_liar(path: &Path, entries: &[(&str, &[u8], u64, bool)]) {
        let crc32 = |data: &[u8]| {
            let mut crc = !0u32;
            for byte in data {
                crc ^= u32::from(*byte);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xedb8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        };
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data, declared, link) in entries {
            let mut extra = Vec::new();
            extra.extend_from_slice(&1u16.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&declared.to_le_bytes());
            extra.extend_from_slice(&(data.len() as u64).to_le_bytes());
            let offset = out.len() as u32;
            let header = |out: &mut Vec<u8>| {
                out.extend_from_slice(&0u16.to_le_bytes()); // flags
                out.extend_from_slice(&0u16.to_le_bytes()); // stored
                out.extend_from_slice(&0u32.to_le_bytes()); // time, date
                out.extend_from_slice(&crc32(data).to_le_bytes());
                out.extend_from_slice(&u32::MAX.to_le_bytes());
                out.extend_from_slice(&u32::MAX.to_le_bytes());
                out.extend_from_slice(&(name.len() as u16).to_le_bytes());
                out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            };
            out.extend_from_slice(b"PK\x03\x04");
            out.extend_from_slice(&45u16.to_le_bytes());
            header(&mut out);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&extra);
            out.extend_from_slice(data);
            central.extend_from_slice(b"PK\x01\x02");
            central.extend_from_slice(&(0x0300u16 | 45).to_le_bytes()); // made by unix
            central.extend_from_slice(&45u16.to_le_bytes());
            header(&mut central);
            central.extend_from_slice(&0u16.to_le_bytes()); // comment
            central.extend_from_slice(&0u16.to_le_bytes()); // disk
            central.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            let mode: u32 = if *link { 0o120777 } else { 0o100644 };
            central.extend_from_slice(&(mode << 16).to_le_bytes());
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
            central.extend_from_slice(&extra);
        }
        let cd_start = out.len() as u32;
        out.extend_from_slice(&central);
        let count = entries.len() as u16;
        out.extend_from_slice(b"PK\x05\x06");
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_start.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        std::fs::write(path, out).expect("write zip");
    }

    #[test]
    fn refuses_a_zip64_entry_declaring_nearly_two_to_the_64_bytes_without_panicking() {
        // 2^64 - 100 and 200 wrap around to 100 in unchecked arithmetic, under any limit.
        let huge = u64::MAX - 99;
        for link in [false, true] {
            let dir = tempfile::tempdir().expect("dir");
            let zip = dir.path().join("liar.zip");
            zip64_liar(
                &zip,
                &[
                    ("huge", b"x", huge, link),
                    ("small", &[b'y'; 200], 200, false),
                ],
            );
            let root = tempfile::tempdir().expect("root");
            let err = prepare(&zip, ROOMY, root.path()).expect_err("refused");
            assert_eq!(
                err.to_string(),
                format!(
                    "package {} is more than 250000000 bytes unpacked, over the limit (limits.package_unpacked)",
                    zip.display()
                )
            );
            assert_eq!(entries_of(root.path()), Vec::<String>::new());
        }
    }

    #[test]
    fn refuses_a_zip_over_the_zipped_limit() {
        let zip = zip_with(&[("a", b"hello", 0o644)]);
        let root = tempfile::tempdir().expect("root");
        let limits = SizeLimits {
            zipped: 10,
            unpacked: 250_000_000,
        };
        let err = prepare(zip.path(), limits, root.path()).expect_err("too large");
        assert!(
            matches!(err, PackageError::ZippedTooLarge { limit: 10, .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_directory_over_the_unpacked_limit() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("f"), [0u8; 2048]).expect("write");
        let root = tempfile::tempdir().expect("root");
        let limits = SizeLimits {
            zipped: 10,
            unpacked: 1024,
        };
        let err = prepare(dir.path(), limits, root.path()).expect_err("too large");
        assert!(err.to_string().contains("limits.package_unpacked"), "{err}");
    }

    #[test]
    fn names_a_missing_package() {
        let root = tempfile::tempdir().expect("root");
        let err = prepare(Path::new("/nonexistent/pkg"), ROOMY, root.path()).expect_err("missing");
        assert_eq!(err.to_string(), "package /nonexistent/pkg does not exist");
    }

    #[test]
    fn refuses_a_symlink_leaving_the_task_root_in_a_zip() {
        for target in ["/dev/zero", "../../etc/passwd", "/etc"] {
            let zip = zip_with_link(&[("bootstrap", b"#!/bin/sh\n")], &[("zero", target)]);
            let root = tempfile::tempdir().expect("root");
            let err = prepare(zip.path(), ROOMY, root.path()).expect_err("refused");
            assert!(
                matches!(&err, PackageError::LinkLeavesPackage { .. })
                    || matches!(&err, PackageError::BadEntry { .. }),
                "{target}: {err}"
            );
            assert_eq!(entries_of(root.path()), Vec::<String>::new());
        }
    }

    #[test]
    fn refuses_a_zip_that_writes_through_its_own_link() {
        // `d` is a link out of the package and `d/evil` a file: unpacked naively, the file
        // lands outside.
        let outside = tempfile::tempdir().expect("outside");
        let zip = zip_with_link(
            &[("d/evil", b"x")],
            &[("d", &outside.path().to_string_lossy())],
        );
        let root = tempfile::tempdir().expect("root");
        assert!(prepare(zip.path(), ROOMY, root.path()).is_err());
        assert_eq!(entries_of(outside.path()), Vec::<String>::new());
        assert_eq!(entries_of(root.path()), Vec::<String>::new());
    }

    #[test]
    fn keeps_links_that_stay_inside_the_package() {
        let zip = zip_with_link(
            &[("lib/real.so", b"elf"), ("bootstrap", b"#!/bin/sh\n")],
            &[("lib/alias.so", "real.so"), ("current", "lib")],
        );
        let root = tempfile::tempdir().expect("root");
        let dir = prepare(zip.path(), ROOMY, root.path()).expect("prepared");
        assert_eq!(
            std::fs::read_link(dir.join("lib/alias.so")).expect("link"),
            Path::new("real.so")
        );
        assert_eq!(
            std::fs::read(dir.join("current/alias.so")).expect("via"),
            b"elf"
        );
    }

    #[test]
    fn refuses_a_symlink_leaving_the_task_root_in_a_directory() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("bootstrap"), "#!/bin/sh\n").expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("sub");
        // A chain: `sub/up` is inside, `sub/up/../..` is not.
        std::os::unix::fs::symlink(".", dir.path().join("sub/here")).expect("link");
        std::os::unix::fs::symlink("here/../..", dir.path().join("sub/out")).expect("link");
        let root = tempfile::tempdir().expect("root");
        let err = prepare(dir.path(), ROOMY, root.path()).expect_err("refused");
        assert!(
            matches!(&err, PackageError::LinkLeavesPackage { link, .. } if link == Path::new("sub/out")),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("sub/out")).expect("rm");
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).expect("link");
        let err = prepare(dir.path(), ROOMY, root.path()).expect_err("refused");
        assert!(
            err.to_string().contains("zero points to /dev/zero"),
            "{err}"
        );
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
    }

    #[test]
    fn refuses_a_fifo_as_package_or_inside_one_without_hanging() {
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("package.zip");
        mkfifo(&fifo);
        let root = tempfile::tempdir().expect("root");
        let err = prepare(&fifo, ROOMY, root.path()).expect_err("refused");
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        let pkg = dir.path().join("pkg");
        std::fs::create_dir(&pkg).expect("pkg");
        mkfifo(&pkg.join("pipe"));
        let err = prepare(&pkg, ROOMY, root.path()).expect_err("refused");
        assert!(err.to_string().contains("pipe is a FIFO"), "{err}");
        let err = prepare(Path::new("/dev/null"), ROOMY, root.path()).expect_err("refused");
        assert!(err.to_string().contains("character device"), "{err}");
    }

    #[test]
    fn reuses_the_copy_unpacked_from_the_same_zip() {
        let zip = zip_with(&[("bootstrap", b"#!/bin/sh\n", 0o755)]);
        let root = tempfile::tempdir().expect("root");
        let first = prepare(zip.path(), ROOMY, root.path()).expect("first");
        let second = prepare(zip.path(), ROOMY, root.path()).expect("second");
        assert_eq!(first, second);
        assert_eq!(entries_of(root.path()).len(), 1);
    }

    #[test]
    fn removes_copies_no_function_uses_any_more() {
        let root = tempfile::tempdir().expect("root");
        let old = prepare(
            zip_with(&[("bootstrap", b"old", 0o755)]).path(),
            ROOMY,
            root.path(),
        )
        .expect("old");
        let new = prepare(
            zip_with(&[("bootstrap", b"new", 0o755)]).path(),
            ROOMY,
            root.path(),
        )
        .expect("new");
        std::fs::create_dir(root.path().join("not-a-copy")).expect("mkdir");
        remove_unused(root.path(), &[new.as_path()]);
        assert!(!old.exists());
        assert!(new.exists());
        assert!(root.path().join("not-a-copy").exists());
    }

    fn assert_sealed(root: &Path) {
        let mut stack = vec![root.to_path_buf()];
        while let Some(path) = stack.pop() {
            let meta = std::fs::symlink_metadata(&path).expect("meta");
            if meta.is_symlink() {
                continue;
            }
            assert_eq!(
                meta.permissions().mode() & 0o222,
                0,
                "{} is writable",
                path.display()
            );
            if meta.is_dir() {
                stack.extend(
                    std::fs::read_dir(&path)
                        .expect("dir")
                        .map(|e| e.expect("entry").path()),
                );
            }
        }
    }

    #[test]
    fn unpacked_and_copied_packages_are_read_only() {
        let zip = zip_with(&[
            ("bootstrap", b"#!/bin/sh\n", 0o755),
            ("lib/data.txt", b"x", 0o666),
        ]);
        let root = tempfile::tempdir().expect("root");
        let dir = prepare(zip.path(), ROOMY, root.path()).expect("prepared");
        assert_sealed(&dir);
        let mode = std::fs::metadata(dir.join("bootstrap"))
            .expect("bootstrap")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o555, "still executable, no longer writable");
        let copy = root.path().join("copy");
        copy_tree(&dir, &copy, ROOMY.unpacked).expect("copy");
        assert_sealed(&copy);
        remove_tree(&copy);
        remove_unused(root.path(), &[]);
        assert_eq!(entries_of(root.path()), Vec::<String>::new());
    }

    #[test]
    fn hashing_and_copying_never_follow_links() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("bootstrap"), "#!/bin/sh\n").expect("write");
        std::os::unix::fs::symlink("bootstrap", dir.path().join("alias")).expect("link");
        let before = tree_sha256(dir.path(), ROOMY.unpacked).expect("hash");
        let copy = tempfile::tempdir().expect("copy");
        copy_tree(dir.path(), &copy.path().join("v1"), ROOMY.unpacked).expect("copy");
        assert_eq!(
            std::fs::read_link(copy.path().join("v1/alias")).expect("link"),
            Path::new("bootstrap")
        );
        assert_eq!(
            tree_sha256(&copy.path().join("v1"), ROOMY.unpacked).expect("hash"),
            before
        );
        // A link planted to /dev/zero is refused at once instead of read forever.
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).expect("link");
        let err = tree_sha256(dir.path(), ROOMY.unpacked).expect_err("refused");
        assert!(
            matches!(err, PackageError::LinkLeavesPackage { .. }),
            "{err}"
        );
        let err =
            copy_tree(dir.path(), &copy.path().join("v2"), ROOMY.unpacked).expect_err("refused");
        assert!(
            matches!(err, PackageError::LinkLeavesPackage { .. }),
            "{err}"
        );
    }
}
