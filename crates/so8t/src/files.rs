//! Reading files that may come from strangers. Only regular files are opened (a FIFO
//! blocks `open` until a writer comes, a device such as `/dev/zero` never ends), and a
//! text file is read only up to a limit for its kind, so that no file can hang a command
//! or size an allocation.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// JSON settings (config.json, tokenizer_config.json, so8t_config.json, an index): the
/// largest real ones (with chat templates) are well under 1 MiB.
pub const SETTINGS_LIMIT: u64 = 64 << 20;
/// tokenizer.json: Qwen's is 11 MiB, a 256k vocabulary about 35 MiB.
pub const TOKENIZER_LIMIT: u64 = 512 << 20;
/// Training and evaluation JSONL.
pub const DATA_LIMIT: u64 = 4 << 30;

/// The file's metadata, refusing anything but a regular file (symlinks are followed).
pub fn regular(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        return Err(Error::format(path, format!("{kind}; expected a regular file")));
    }
    Ok(meta)
}

/// Opens a regular file.
pub fn open(path: &Path) -> Result<std::fs::File> {
    regular(path)?;
    std::fs::File::open(path).map_err(|e| Error::io(path, e))
}

/// The bytes of a regular file of at most `limit` bytes.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let size = regular(path)?.len();
    if size > limit {
        return Err(Error::format(
            path,
            format!("{size} bytes, more than the {limit} a file of this kind may have"),
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // The size may change after the check: never read past the limit.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::format(path, format!("grew past {limit} bytes while being read")));
    }
    Ok(bytes)
}

/// A UTF-8 text file of at most `limit` bytes.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read(path, limit)?)
        .map_err(|e| Error::format(path, format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to())))
}

/// [`read_text`] for an optional file: `None` when it does not exist.
pub fn read_text_if_exists(path: &Path, limit: u64) -> Result<Option<String>> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => read_text(path, limit).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_directories_and_big_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let zero = tmp.path().join("config.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(read_text(&zero, SETTINGS_LIMIT).unwrap_err().to_string().contains("not a regular file"));
        let fifo = tmp.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.map(|s| s.success()).unwrap_or(false) {
            // Would block forever in open() if it were opened.
            assert!(open(&fifo).unwrap_err().to_string().contains("FIFO"));
        }
        assert!(read(tmp.path(), 10).unwrap_err().to_string().contains("directory"));
        let big = tmp.path().join("big");
        std::fs::write(&big, vec![b'x'; 11]).unwrap();
        assert!(read(&big, 10).unwrap_err().to_string().contains("11 bytes"));
        assert_eq!(read(&big, 11).unwrap().len(), 11);
        assert_eq!(read_text_if_exists(&tmp.path().join("none"), 10).unwrap(), None);
    }
}

/// sha256 of a file's bytes, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    feed(&mut h, path)?;
    Ok(format!("{:x}", h.finalize()))
}

/// sha256 over the files `names` of `dir`, in the order given, each as its name, a NUL
/// and its bytes: renaming a file changes it as much as changing a byte does.
pub fn sha256_named(dir: &Path, names: &[String]) -> Result<String> {
    let mut h = Sha256::new();
    for n in names {
        h.update(n.as_bytes());
        h.update([0u8]);
        feed(&mut h, &dir.join(n))?;
    }
    Ok(format!("{:x}", h.finalize()))
}

fn feed(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if k == 0 {
            return Ok(());
        }
        h.update(&buf[..k]);
    }
}
