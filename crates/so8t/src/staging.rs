//! Writing a directory all at once: files go into a hidden sibling directory, which
//! replaces the target only when complete. An interrupted run leaves the target as it was
//! (and at most a hidden `.NAME.tmp-PID` that the next run of the same process id removes).

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
            return Err(Error::format(target, "already exists (use --force to replace it)"));
        }
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let name = target.file_name().ok_or_else(|| Error::format(target, "not a directory name"))?.to_string_lossy();
        let path = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(StagingDir { path: Some(path), target: target.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("staging directory already committed")
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
