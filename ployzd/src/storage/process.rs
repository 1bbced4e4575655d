//! The storage backends' child processes: run a CLI (`btrfs`, `zfs`) to
//! completion, expose a child's stdout as a [`SendStream`] that ends with an
//! error when the child fails, and feed a [`SendStream`] into a child's stdin.
//! A child is always owned by the value that spawned it and is killed when that
//! value is dropped; nothing here detaches a task or a process.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    future::Future,
    io,
    path::Path,
    pin::Pin,
    process::{ExitStatus, Stdio},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf},
    process::{Child, ChildStderr, ChildStdout, Command},
};

use super::{SendStream, StorageError};

/// How much of a failed child's stderr an error keeps (its end, where tools
/// put the reason).
const STDERR_TAIL: usize = 8 * 1024;

/// Chunk size when copying a stream into a child's stdin.
const FEED_CHUNK: usize = 256 * 1024;

/// One command line, kept as data so errors can name it.
#[derive(Clone, Debug)]
pub(crate) struct Invocation {
    program: &'static str,
    args: Vec<OsString>,
}

/// What a child printed when it succeeded.
#[derive(Debug)]
pub(crate) struct Output {
    pub stdout: String,
    pub stderr: String,
}

impl Invocation {
    pub fn new(program: &'static str) -> Self {
        Self {
            program,
            args: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    fn command(&self) -> Command {
        let mut command = Command::new(self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    fn spawn_error(&self, source: io::Error) -> StorageError {
        StorageError::Command {
            command: self.to_string(),
            stderr: format!("cannot start {}: {source}", self.program),
        }
    }

    fn failure(&self, status: ExitStatus, stderr: &[u8]) -> StorageError {
        StorageError::Command {
            command: self.to_string(),
            stderr: describe_failure(status, stderr),
        }
    }

    /// Runs the command to completion; a non-zero exit is an error carrying
    /// its stderr.
    pub async fn run(&self) -> Result<Output, StorageError> {
        let output = self
            .command()
            .output()
            .await
            .map_err(|source| self.spawn_error(source))?;
        if !output.status.success() {
            return Err(self.failure(output.status, &output.stderr));
        }
        Ok(Output {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Runs the command to completion without a runtime, for provisioning code
    /// that also runs in `Drop`.
    pub fn run_blocking(&self) -> Result<Output, StorageError> {
        let output = std::process::Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| self.spawn_error(source))?;
        if !output.status.success() {
            return Err(self.failure(output.status, &output.stderr));
        }
        Ok(Output {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Starts the command and returns its stdout as a stream that owns the
    /// child. The stream ends cleanly only if the child exits successfully;
    /// otherwise its last read fails with [`StorageError::Command`] inside the
    /// `io::Error`, so a failed send can never pass for a short one.
    pub fn spawn_stream(&self) -> Result<SendStream, StorageError> {
        let stream = ChildStream::spawn(self)?;
        Ok(Box::pin(stream))
    }

    /// Copies `input` into the command's stdin and waits for it. If reading
    /// `input` fails, `on_broken_input` says how the receiver learns of it,
    /// and the input's error is returned: the [`StorageError`] it carries, or
    /// [`StorageError::Io`] on `path`.
    pub async fn feed(
        &self,
        mut input: SendStream,
        path: &Path,
        on_broken_input: BrokenInput,
    ) -> Result<Output, StorageError> {
        let mut command = self.command();
        command.stdin(Stdio::piped());
        let mut child = command.spawn().map_err(|source| self.spawn_error(source))?;
        let stdin = child.stdin.take().expect("stdin was configured as piped");
        let mut stdout = child.stdout.take().expect("stdout was configured as piped");
        let mut stderr = child.stderr.take().expect("stderr was configured as piped");

        let pump = async {
            // Owned by this block so it closes (ending the child's input) when the block ends.
            let mut stdin = stdin;
            let mut chunk = vec![0; FEED_CHUNK];
            loop {
                let read = match input.read(&mut chunk).await {
                    Ok(0) => break Pumped::Complete,
                    Ok(read) => read,
                    Err(error) => {
                        // Kill before stdin closes, or the receiver would take
                        // the cut for the stream's end.
                        if on_broken_input == BrokenInput::KillReceiver
                            && let Err(kill) = child.start_kill()
                        {
                            tracing::warn!(command = %self, error = %kill, "cannot kill receiver");
                        }
                        break Pumped::InputFailed(error);
                    }
                };
                if let Err(error) = stdin.write_all(&chunk[..read]).await {
                    break Pumped::ChildStoppedReading(error);
                }
            }
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (pumped, out_read, err_read) = tokio::join!(
            pump,
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err)
        );
        let status = child.wait().await.map_err(|source| StorageError::Io {
            path: path.to_owned(),
            source,
        })?;
        match pumped {
            Pumped::InputFailed(error) => return Err(stream_error(error, path)),
            Pumped::ChildStoppedReading(_) | Pumped::Complete if !status.success() => {
                return Err(self.failure(status, &err));
            }
            Pumped::ChildStoppedReading(error) => {
                return Err(StorageError::Command {
                    command: self.to_string(),
                    stderr: format!("exited before reading the whole stream: {error}"),
                });
            }
            Pumped::Complete => {}
        }
        for read in [out_read, err_read] {
            read.map_err(|source| StorageError::Io {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(Output {
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        })
    }
}

impl fmt::Display for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program)?;
        for arg in &self.args {
            write!(f, " {}", arg.to_string_lossy())?;
        }
        Ok(())
    }
}

/// How a receiver learns that its input broke off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BrokenInput {
    /// Kill it before its stdin closes: for receivers that would commit a
    /// stream cut at a record boundary (`btrfs receive`).
    KillReceiver,
    /// Close its stdin and wait: for receivers that verify the stream's end
    /// and clean up after themselves (`zfs receive`; killing the zfs-fuse
    /// client would leave its daemon receiving).
    EndInput,
}

/// How copying a stream into a child ended.
enum Pumped {
    Complete,
    InputFailed(io::Error),
    ChildStoppedReading(io::Error),
}

/// Turns a failed read of a [`SendStream`] back into the storage error it
/// carries (a sender's failure), or an I/O error on `path`.
pub(crate) fn stream_error(error: io::Error, path: &Path) -> StorageError {
    if error
        .get_ref()
        .is_some_and(|inner| inner.is::<StorageError>())
    {
        let inner = error
            .into_inner()
            .expect("get_ref just returned the wrapped error");
        return *inner
            .downcast::<StorageError>()
            .expect("the wrapped error was just checked to be a StorageError");
    }
    StorageError::Io {
        path: path.to_owned(),
        source: error,
    }
}

fn describe_failure(status: ExitStatus, stderr: &[u8]) -> String {
    let stderr = String::from_utf8_lossy(stderr);
    let stderr = stderr.trim();
    if stderr.is_empty() {
        format!("{status}")
    } else {
        format!("{stderr} ({status})")
    }
}

/// How long dropping an unfinished stream waits for its killed child.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// A child's stdout as an [`AsyncRead`] that owns the child.
///
/// Reading past the end of stdout waits for the child's exit status: success
/// is end-of-stream, failure is an error carrying stderr's tail. Stderr is
/// drained on every read so a chatty child cannot block on a full pipe.
/// Dropping an unfinished stream kills the child and waits for it to exit, so
/// whatever it held (a snapshot being sent) is released when `drop` returns;
/// a killed sender exits within milliseconds.
struct ChildStream {
    command: String,
    stdout: ChildStdout,
    /// `None` once stderr reached its end.
    stderr: Option<ChildStderr>,
    stderr_tail: Vec<u8>,
    stdout_done: bool,
    child: Child,
    /// Set once the child has been reaped: `Err` holds the failure message.
    outcome: Option<Result<(), String>>,
}

impl ChildStream {
    fn spawn(invocation: &Invocation) -> Result<Self, StorageError> {
        let mut child = invocation
            .command()
            .spawn()
            .map_err(|source| invocation.spawn_error(source))?;
        let stdout = child.stdout.take().expect("stdout was configured as piped");
        let stderr = child.stderr.take().expect("stderr was configured as piped");
        Ok(Self {
            command: invocation.to_string(),
            stdout,
            stderr: Some(stderr),
            stderr_tail: Vec::new(),
            stdout_done: false,
            child,
            outcome: None,
        })
    }

    fn failure(&self, message: &str) -> io::Error {
        io::Error::other(StorageError::Command {
            command: self.command.clone(),
            stderr: message.to_owned(),
        })
    }

    /// Reads whatever stderr has; `Ready` once it reached its end.
    fn poll_stderr(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut chunk = [0_u8; 1024];
        while let Some(stderr) = self.stderr.as_mut() {
            let mut buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(stderr).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                self.stderr = None;
            } else {
                self.stderr_tail.extend_from_slice(buf.filled());
                let excess = self.stderr_tail.len().saturating_sub(STDERR_TAIL);
                self.stderr_tail.drain(..excess);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ChildStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(outcome) = &this.outcome {
            return Poll::Ready(match outcome {
                Ok(()) => Ok(()),
                Err(message) => Err(this.failure(message)),
            });
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // Drain stderr opportunistically; `Pending` only means it has nothing yet.
        if let Poll::Ready(Err(error)) = this.poll_stderr(cx) {
            return Poll::Ready(Err(error));
        }
        if !this.stdout_done {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.stdout).poll_read(cx, buf))?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            this.stdout_done = true;
        }
        // Stdout ended: the stream's verdict is the child's exit status.
        ready!(this.poll_stderr(cx))?;
        // `Child::wait` is cancel safe: a pending wait dropped here still
        // wakes this task when the child exits.
        let status = ready!(std::pin::pin!(this.child.wait()).poll(cx))?;
        let outcome = if status.success() {
            Ok(())
        } else {
            Err(describe_failure(status, &this.stderr_tail))
        };
        let result = match &outcome {
            Ok(()) => Ok(()),
            Err(message) => Err(this.failure(message)),
        };
        this.outcome = Some(outcome);
        Poll::Ready(result)
    }
}

impl Drop for ChildStream {
    fn drop(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        if let Err(error) = self.child.start_kill() {
            tracing::warn!(command = %self.command, %error, "cannot kill an abandoned stream's child");
            return;
        }
        // Reap it now rather than in the background: the caller may destroy
        // the snapshot next, which fails while a send still holds it.
        let deadline = Instant::now() + REAP_TIMEOUT;
        let mut pause = Duration::from_micros(200);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Ok(None) => {
                    // kill_on_drop has fired; tokio reaps it whenever it exits.
                    tracing::warn!(command = %self.command, "an abandoned stream's child outlived its kill");
                    return;
                }
                Err(error) => {
                    tracing::warn!(command = %self.command, %error, "cannot reap an abandoned stream's child");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    /// The command and stderr of a [`StorageError::Command`].
    fn command_error(error: &StorageError) -> (&str, &str) {
        if let StorageError::Command { command, stderr } = error {
            return (command, stderr);
        }
        panic!("expected a command error, got {error:?}");
    }

    fn shell(script: &str) -> Invocation {
        Invocation::new("sh").args(["-c", script])
    }

    #[tokio::test]
    async fn a_successful_child_streams_its_stdout_to_the_end() {
        let mut stream = shell("printf 'hello '; printf 'world' ; echo noise >&2")
            .spawn_stream()
            .expect("spawn sh");
        let mut out = String::new();
        stream.read_to_string(&mut out).await.expect("clean end");
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn a_failing_child_ends_its_stream_with_an_error_not_an_eof() {
        let mut stream = shell("printf partial; echo 'disk on fire' >&2; exit 3")
            .spawn_stream()
            .expect("spawn sh");
        let mut out = Vec::new();
        let error = stream
            .read_to_end(&mut out)
            .await
            .expect_err("the child failed");
        assert_eq!(out, b"partial");
        let error = stream_error(error, Path::new("/x"));
        let (command, stderr) = command_error(&error);
        assert!(command.starts_with("sh -c"), "{command}");
        assert!(stderr.contains("disk on fire"), "{stderr}");
        assert!(stderr.contains("exit status: 3"), "{stderr}");
        // Reading again repeats the failure instead of reporting an end.
        assert!(stream.read(&mut [0; 8]).await.is_err());
    }

    #[tokio::test]
    async fn a_child_flooding_stderr_does_not_stall_the_stream() {
        let mut stream = shell("head -c 1000000 /dev/zero >&2; printf done")
            .spawn_stream()
            .expect("spawn sh");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut out))
            .await
            .expect("no deadlock on a full stderr pipe")
            .expect("clean end");
        assert_eq!(out, "done");
    }

    #[tokio::test]
    async fn dropping_the_stream_kills_and_reaps_the_child() {
        let stream = ChildStream::spawn(&shell("printf started; exec sleep 60")).expect("spawn sh");
        let pid = stream.child.id().expect("running");
        let mut stream: SendStream = Box::pin(stream);
        let mut first = [0; 7];
        stream.read_exact(&mut first).await.expect("first bytes");
        drop(stream);
        // A killed but unreaped child would stay in /proc as a zombie.
        let proc = format!("/proc/{pid}");
        assert!(
            !Path::new(&proc).exists(),
            "child {pid} still exists after drop: {}",
            std::fs::read_to_string(format!("{proc}/stat")).unwrap_or_default()
        );
    }

    struct Failing {
        sent: bool,
    }

    impl AsyncRead for Failing {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.sent {
                return Poll::Ready(Err(io::Error::other(StorageError::Command {
                    command: "sender".to_owned(),
                    stderr: "sender broke".to_owned(),
                })));
            }
            self.sent = true;
            buf.put_slice(b"first half\n");
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn feed_reports_the_senders_error_and_kills_the_receiver_before_eof() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let marker = dir.path().join("committed");
        // A receiver that saw the end of its input would commit (touch the marker).
        let receiver = shell(&format!("cat >/dev/null && touch {}", marker.display()));
        let error = receiver
            .feed(
                Box::pin(Failing { sent: false }),
                Path::new("/target"),
                BrokenInput::KillReceiver,
            )
            .await
            .expect_err("the input failed");
        assert_eq!(command_error(&error), ("sender", "sender broke"));
        // `cat` (not killed, only its shell) exits at EOF; give it a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!marker.exists(), "the receiver committed a broken stream");
    }

    #[tokio::test]
    async fn feed_can_let_the_receiver_see_the_end_of_a_broken_input() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let marker = dir.path().join("saw-end");
        let receiver = shell(&format!("cat >/dev/null && touch {}", marker.display()));
        let error = receiver
            .feed(
                Box::pin(Failing { sent: false }),
                Path::new("/target"),
                BrokenInput::EndInput,
            )
            .await
            .expect_err("the input failed");
        assert_eq!(command_error(&error), ("sender", "sender broke"));
        assert!(marker.exists(), "the receiver ran to the end of its input");
    }

    #[tokio::test]
    async fn feed_reports_a_failing_receiver() {
        let error = shell("head -c 3 >/dev/null; echo 'bad stream' >&2; exit 1")
            .feed(
                Box::pin(&b"0123456789"[..]),
                Path::new("/target"),
                BrokenInput::KillReceiver,
            )
            .await
            .expect_err("the receiver failed");
        let (_, stderr) = command_error(&error);
        assert!(stderr.contains("bad stream"), "{stderr}");
    }

    #[tokio::test]
    async fn feed_returns_the_receivers_output() {
        let output = shell("wc -c")
            .feed(
                Box::pin(&b"0123456789"[..]),
                Path::new("/target"),
                BrokenInput::KillReceiver,
            )
            .await
            .expect("wc succeeds");
        assert_eq!(output.stdout.trim(), "10");
    }
}
