//! Writing a file or a directory all at once: it is written under a hidden sibling name,
//! which replaces the target only when complete (a directory by an atomic exchange), so
//! `kill -9` at any moment leaves the complete old state or the complete new one. An
//! interrupted run leaves at most a hidden `.NAME.tmp-PID`, which the next run that writes
//! the same target removes once that process is gone.

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
        let parent = parent_dir(target);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let path = fresh_temp_dir(target)?;
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
        replace_dir(&path, &self.target)
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Puts the complete directory `new` at `target`. An existing target is swapped with it
/// in one step (Linux `renameat2(RENAME_EXCHANGE)`), then removed from `new`'s path;
/// where the filesystem cannot exchange, the old one is moved aside first (a kill between
/// the two renames leaves it at `.NAME.old-PID`).
pub fn replace_dir(new: &Path, target: &Path) -> Result<()> {
    if std::fs::symlink_metadata(target).is_err() {
        return std::fs::rename(new, target).map_err(|e| Error::io(target, e));
    }
    if exchange(new, target).is_ok() {
        let _ = std::fs::remove_dir_all(new);
        return Ok(());
    }
    let aside = own_sibling(target, "old")?;
    std::fs::rename(target, &aside).map_err(|e| Error::io(target, e))?;
    std::fs::rename(new, target).map_err(|e| Error::io(target, e))?;
    let _ = std::fs::remove_dir_all(&aside);
    Ok(())
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Removes `.NAME.tmp-PID` and `.NAME.old-PID` siblings of `target` left by processes
/// that no longer run (killed mid-write).
pub fn remove_stale(target: &Path) {
    let Some(name) = target.file_name() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent_dir(target)) else {
        return;
    };
    let name = name.to_string_lossy();
    for e in entries.flatten() {
        let f = e.file_name().to_string_lossy().to_string();
        let pid = [".tmp-", ".old-"]
            .iter()
            .find_map(|k| f.strip_prefix(&format!(".{name}{k}")))
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let p = e.path();
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

/// The directory `target` is in (`.` for a bare name).
fn parent_dir(target: &Path) -> &Path {
    target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `.NAME.SUFFIX` beside `target` (NAME being its file name): where it is staged.
pub fn hidden_sibling(target: &Path, suffix: &str) -> Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::format(target, "not a file or directory name"))?
        .to_string_lossy();
    Ok(parent_dir(target).join(format!(".{name}.{suffix}")))
}

/// This process's `.NAME.KIND-PID` beside `target`.
fn own_sibling(target: &Path, kind: &str) -> Result<PathBuf> {
    hidden_sibling(target, &format!("{kind}-{}", std::process::id()))
}

/// The hidden sibling a target is written under before it is renamed into place.
pub fn temp_path(target: &Path) -> Result<PathBuf> {
    own_sibling(target, "tmp")
}

/// This process's [`temp_path`] of `target`, created empty, after the leftovers of killed
/// writers of the same target are removed.
fn fresh_temp_dir(target: &Path) -> Result<PathBuf> {
    let dir = temp_path(target)?;
    remove_stale(target);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Writes the file `target` all at once: `write` fills a path inside this process's
/// hidden `.NAME.tmp-PID` directory beside the target, and that file is renamed onto
/// `target` when `write` succeeds. The directory goes afterwards, whatever happened, and
/// with it anything else a writer left there (the safetensors crate stages each file
/// under its own random `.tmpXXXXXX` name, which a kill would otherwise strand beside the
/// target). The file gets the mode any new file gets here (the umask's), not the 0600 of
/// such private temporaries. Errors should name `target`: the temporary name is an
/// implementation detail.
pub fn write_file<T>(target: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::format(target, "not a file name"))?;
    let dir = fresh_temp_dir(target)?;
    let tmp = dir.join(name);
    let written = write(&tmp).and_then(|v| {
        give_new_file_mode(&dir, &tmp).map_err(|e| Error::io(target, e))?;
        std::fs::rename(&tmp, target).map_err(|e| Error::io(target, e))?;
        Ok(v)
    });
    let _ = std::fs::remove_dir_all(&dir);
    written
}

/// Sets `file`'s permissions to those a file created in `dir` gets (mode 0666 less the
/// umask), which a probe file shows without touching the process-wide umask.
fn give_new_file_mode(dir: &Path, file: &Path) -> std::io::Result<()> {
    let probe = dir.join(".mode");
    let usual = std::fs::File::create(&probe)?.metadata()?.permissions();
    std::fs::remove_file(&probe)?;
    if std::fs::metadata(file)?.permissions() != usual {
        std::fs::set_permissions(file, usual)?;
    }
    Ok(())
}

/// [`write_file`] of bytes.
pub fn write_bytes(target: &Path, bytes: &[u8]) -> Result<()> {
    write_file(target, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(target, e))
    })
}

/// Hard-links (or, across filesystems, copies) the entries of `src` that `keep` accepts
/// (by name and whether it is a file) into `dst`, directories recursively.
pub fn link_tree(src: &Path, dst: &Path, keep: &dyn Fn(&str, bool) -> bool) -> Result<()> {
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        let (from, to) = (e.path(), dst.join(&name));
        let ty = e.file_type().map_err(|err| Error::io(&from, err))?;
        if ty.is_dir() && keep(&name, false) {
            std::fs::create_dir_all(&to).map_err(|err| Error::io(&to, err))?;
            link_tree(&from, &to, &|_, _| true)?;
        } else if from.is_file() && keep(&name, true) && std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(|err| Error::io(&to, err))?;
        }
    }
    Ok(())
}

/// Puts every entry of `src` except those named in `skip` into `dst`, as it is: files
/// hard-linked (copied across filesystems), directories recursively, symlinks recreated
/// with the same target. Any other kind of entry (FIFO, socket, device) is an error,
/// not silently left behind.
pub fn carry_over(src: &Path, dst: &Path, skip: &[std::ffi::OsString]) -> Result<()> {
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        if skip.contains(&e.file_name()) {
            continue;
        }
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let ty = e.file_type().map_err(|err| Error::io(&from, err))?;
        if ty.is_symlink() {
            let target = std::fs::read_link(&from).map_err(|err| Error::io(&from, err))?;
            std::os::unix::fs::symlink(&target, &to).map_err(|err| Error::io(&to, err))?;
        } else if ty.is_dir() {
            std::fs::create_dir(&to).map_err(|err| Error::io(&to, err))?;
            carry_over(&from, &to, &[])?;
        } else if ty.is_file() {
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(|err| Error::io(&to, err))?;
            }
        } else {
            return Err(Error::format(
                &from,
                "is not a file, directory or symlink, so it cannot be kept; move it away first",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_dir_swaps_and_stale_temporaries_go() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("model");
        let new = tmp.path().join("new");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("a"), "old").unwrap();
        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("a"), "new").unwrap();
        replace_dir(&new, &target).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "new");
        assert!(!new.exists());
        // Leftovers of a process that is gone (pid 0 never names one) are removed; the
        // running process's own are not.
        let dead = tmp.path().join(".model.tmp-0");
        let ours = temp_path(&target).unwrap();
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(&ours, "x").unwrap();
        remove_stale(&target);
        assert!(!dead.exists() && ours.exists());
    }

    /// A writer's own temporaries go with the staging directory, whether it succeeds or
    /// fails, and the file gets the usual mode, not the 0600 of a private temporary.
    #[test]
    fn write_file_leaves_only_the_target_with_the_usual_mode() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("w.safetensors");
        let usual = {
            let p = tmp.path().join("probe");
            std::fs::write(&p, "").unwrap();
            let m = std::fs::metadata(&p).unwrap().permissions().mode();
            std::fs::remove_file(&p).unwrap();
            m
        };
        write_file(&target, |t| {
            std::fs::write(t.with_file_name(".tmpXYZ"), "stray").unwrap();
            std::fs::write(t, "data").unwrap();
            std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o600)).unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "data");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode(), usual);
        let err = write_file(&target, |t| {
            std::fs::write(t, "half").unwrap();
            Err::<(), _>(Error::format(&target, "disk full"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "data");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["w.safetensors"]);
    }
}
