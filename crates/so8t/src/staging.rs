//! Writing a file or a directory all at once: it is written under a hidden sibling name,
//! which replaces the target only when complete. An interrupted run leaves the target as
//! it was (and at most a hidden `.NAME.tmp-PID` that the next run of the same process id
//! removes).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub struct StagingDir {
    path: Option<PathBuf>,
    target: PathBuf,
}

impl StagingDir {
    /// Refuses an existing target unless `force`.
    pub fn new(target: &Path, force: bool) -> Result<StagingDir> {
        if target.exists() && !force {
            return Err(Error::format(
                target,
                "already exists (use --force to replace it)",
            ));
        }
        let path = temp_path(target)?;
        let parent = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(StagingDir {
            path: Some(path),
            target: target.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        self.path
            .as_deref()
            .expect("staging directory already committed")
    }

    pub fn commit(mut self) -> Result<()> {
        let path = self.path.take().expect("committed twice");
        if self.target.exists() {
            std::fs::remove_dir_all(&self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        std::fs::rename(&path, &self.target).map_err(|e| Error::io(&self.target, e))
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// The hidden sibling a target is written under before it is renamed into place.
pub fn temp_path(target: &Path) -> Result<PathBuf> {
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .ok_or_else(|| Error::format(target, "not a file or directory name"))?
        .to_string_lossy();
    Ok(parent.join(format!(".{name}.tmp-{}", std::process::id())))
}

/// Writes the file `target` all at once: `write` fills the temporary name it is given,
/// which replaces `target` when `write` succeeds and is removed when it fails. Errors
/// should name `target`: the temporary name is an implementation detail.
pub fn write_file<T>(target: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let tmp = temp_path(target)?;
    match write(&tmp) {
        Ok(v) => {
            std::fs::rename(&tmp, target).map_err(|e| Error::io(target, e))?;
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// [`write_file`] of bytes.
pub fn write_bytes(target: &Path, bytes: &[u8]) -> Result<()> {
    write_file(target, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(target, e))
    })
}
