//! Function packages: a directory, or a `.zip` unpacked once into the data directory, both
//! held to Lambda's size limits.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PackageError {
    #[error("package {path} does not exist")]
    Missing { path: PathBuf },
    #[error("package {path} is neither a directory nor a .zip file")]
    NotAPackage { path: PathBuf },
    #[error(
        "package {path} is {size} bytes zipped, over the limit of {limit} bytes (limits.package_zipped)"
    )]
    ZippedTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error(
        "package {path} is {size} bytes unpacked, over the limit of {limit} bytes (limits.package_unpacked)"
    )]
    UnpackedTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
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

/// Returns the directory the function runs in, unpacking a zip under `unpack_root` if needed.
pub fn prepare(
    package: &Path,
    limits: SizeLimits,
    unpack_root: &Path,
) -> Result<PathBuf, PackageError> {
    let io_err = |source| PackageError::Io {
        path: package.to_path_buf(),
        source,
    };
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
        let size = dir_size(package).map_err(io_err)?;
        if size > limits.unpacked {
            return Err(PackageError::UnpackedTooLarge {
                path: package.to_path_buf(),
                size,
                limit: limits.unpacked,
            });
        }
        return std::fs::canonicalize(package).map_err(io_err);
    }
    let is_zip = package
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"));
    if !is_zip {
        return Err(PackageError::NotAPackage {
            path: package.to_path_buf(),
        });
    }
    if meta.len() > limits.zipped {
        return Err(PackageError::ZippedTooLarge {
            path: package.to_path_buf(),
            size: meta.len(),
            limit: limits.zipped,
        });
    }
    let zip_err = |source| PackageError::Zip {
        path: package.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(package).map_err(io_err)?;
    let mut archive = zip::ZipArchive::new(file).map_err(zip_err)?;
    // Sizes come from the central directory, so an oversized archive is refused before a
    // single byte is written.
    let mut unpacked = 0u64;
    for i in 0..archive.len() {
        unpacked += archive.by_index_raw(i).map_err(zip_err)?.size();
    }
    if unpacked > limits.unpacked {
        return Err(PackageError::UnpackedTooLarge {
            path: package.to_path_buf(),
            size: unpacked,
            limit: limits.unpacked,
        });
    }
    std::fs::create_dir_all(unpack_root).map_err(io_err)?;
    let target = tempfile::Builder::new()
        .prefix("package-")
        .tempdir_in(unpack_root)
        .map_err(io_err)?
        .keep();
    archive.extract(&target).map_err(zip_err)?;
    Ok(target)
}

fn dir_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total)
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

    #[test]
    fn unpacks_a_zip_keeping_the_executable_bit() {
        use std::os::unix::fs::PermissionsExt;
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
        assert!(matches!(
            err,
            PackageError::UnpackedTooLarge {
                size: 4096,
                limit: 1000,
                ..
            }
        ));
        assert_eq!(std::fs::read_dir(root.path()).expect("root").count(), 0);
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
}
