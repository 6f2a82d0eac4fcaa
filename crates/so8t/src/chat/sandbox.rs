//! Chat templates rendered in a child process with a memory and CPU budget.
//!
//! A template comes from the checkpoint, i.e. from whoever published it. minijinja runs
//! no code, its fuel bounds the instructions and the output is capped, but
//! nothing bounds the memory its values take: `{% set ns.s = ns.s ~ ns.s %}` in a loop
//! doubles a string each turn and reaches gigabytes in some thirty instructions (so do
//! list `+`, `replace` and recursive macros). minijinja has no allocation hook, and in
//! Rust a failed allocation aborts the process, so the budget is enforced where an abort
//! costs nothing: a child (the `so8t` binary itself, run as `so8t __render-chat-template`)
//! limits its own data segment and CPU time, renders, and writes the texts back. The
//! binary enables this at start ([`enable`]); without it (the library inside a test or
//! another program) templates render in the calling process.
//!
//! A render costs one process start (~2 ms here): once per prompt in `run` and `serve`,
//! twice with the `user_end` verdict position.

use super::{ChatTemplate, Message, RenderFailure};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;

/// The argument that makes the `so8t` binary a render child.
pub const CHILD_ARG: &str = "__render-chat-template";
/// The child's data segment (heap and private mappings). A real template's values take
/// kilobytes; this leaves room for the capped output of two renders and the messages.
pub const MEMORY_LIMIT: u64 = 512 << 20;
/// The child's CPU time; fuel ends a looping template long before.
const CPU_SECONDS: u64 = 60;

static EXECUTABLE: OnceLock<PathBuf> = OnceLock::new();

/// Render chat templates in child processes of `exe`, which must call [`child_main`] when
/// its first argument is [`CHILD_ARG`]. The first call wins.
pub fn enable(exe: PathBuf) {
    let _ = EXECUTABLE.set(exe);
}

pub(super) fn executable() -> Option<&'static Path> {
    EXECUTABLE.get().map(PathBuf::as_path)
}

#[derive(Serialize)]
struct Request<'a> {
    source: &'a str,
    bos: &'a str,
    eos: &'a str,
    conversations: &'a [(&'a [Message], bool)],
}

#[derive(Deserialize)]
struct OwnedRequest {
    source: String,
    bos: String,
    eos: String,
    conversations: Vec<(Vec<Message>, bool)>,
}

type Reply = std::result::Result<Vec<String>, RenderFailure>;

/// `template`'s renders of `conversations` in a child of `exe`. The outer error is the
/// child failing to start; a child that dies (of its memory or CPU budget) is the
/// template's failure.
pub(super) fn render(
    exe: &Path,
    template: &ChatTemplate,
    conversations: &[(&[Message], bool)],
) -> Result<Reply> {
    let request = serde_json::to_vec(&Request {
        source: &template.source,
        bos: &template.bos,
        eos: &template.eos,
        conversations,
    })
    .map_err(|e| Error::Invalid(format!("chat template request: {e}")))?;
    let mut child = Command::new(exe)
        .arg(CHILD_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(exe, e))?;
    // The child reads all of its input before it writes: no deadlock. A child that died
    // early breaks the pipe; its exit status below says why.
    let _ = child.stdin.take().expect("piped").write_all(&request);
    let out = child.wait_with_output().map_err(|e| Error::io(exe, e))?;
    if !out.status.success() {
        return Ok(Err(RenderFailure { raised: false, why: death(&out.status, &out.stderr) }));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::Invalid(format!("{} {CHILD_ARG}: unreadable reply: {e}", exe.display()))
    })
}

/// Why a render child ended without a reply.
fn death(status: &std::process::ExitStatus, stderr: &[u8]) -> String {
    use std::os::unix::process::ExitStatusExt;
    let said = String::from_utf8_lossy(stderr);
    let memory = format!("the chat template needed more than {} MiB of memory while rendering", MEMORY_LIMIT >> 20);
    match status.signal() {
        Some(libc::SIGABRT) if said.contains("memory allocation") => memory,
        Some(libc::SIGXCPU) | Some(libc::SIGKILL) => {
            format!("the chat template ran out of its {CPU_SECONDS} s of CPU time while rendering")
        }
        _ => format!(
            "the render process ended with {status}: {}",
            said.lines().last().unwrap_or("no message")
        ),
    }
}

/// Lowers `resource` to `value` (or keeps the lower limit the process inherited).
fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> bool {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    unsafe {
        if libc::getrlimit(resource, &mut lim) != 0 {
            return false;
        }
        let v = value.min(lim.rlim_max);
        lim = libc::rlimit { rlim_cur: v, rlim_max: v };
        libc::setrlimit(resource, &lim) == 0
    }
}

/// The render child: limits itself, reads one request from stdin, writes the reply to
/// stdout. Exit 0 with a reply (texts or the template's error), 2 when the request
/// itself cannot be read or its limits not set.
pub fn child_main() -> ExitCode {
    if !(set_limit(libc::RLIMIT_DATA, MEMORY_LIMIT) && set_limit(libc::RLIMIT_CPU, CPU_SECONDS)) {
        eprintln!("so8t {CHILD_ARG}: cannot set the memory and CPU limits: {}", std::io::Error::last_os_error());
        return ExitCode::from(2);
    }
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().lock().read_to_end(&mut input) {
        eprintln!("so8t {CHILD_ARG}: reading the request: {e}");
        return ExitCode::from(2);
    }
    let request: OwnedRequest = match serde_json::from_slice(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("so8t {CHILD_ARG}: not a render request: {e}");
            return ExitCode::from(2);
        }
    };
    drop(input);
    let reply: Reply = match ChatTemplate::new(&request.source, &request.bos, &request.eos) {
        Ok(t) => request
            .conversations
            .iter()
            .map(|(messages, add)| t.render_here(messages, *add))
            .collect(),
        Err(e) => Err(RenderFailure { raised: false, why: e.to_string() }),
    };
    let mut stdout = std::io::stdout().lock();
    match serde_json::to_writer(&mut stdout, &reply).map_err(std::io::Error::other).and_then(|_| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("so8t {CHILD_ARG}: writing the reply: {e}");
            ExitCode::from(2)
        }
    }
}
