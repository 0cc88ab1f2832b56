//! Child processes that die with align: a shell command started in its own process group,
//! whose whole group is killed when it is finished with, when it times out, when align
//! returns an error or panics, and when align is terminated by SIGTERM, SIGINT or SIGHUP.
//!
//! A command run with `sh -c` may start children of its own (a pipeline, a `python` under
//! the shell); killing only the shell would leave them running. Each [`GroupChild`] is the
//! leader of a new process group, and its group id is kept in a small table that a signal
//! handler reads, so a terminated align takes the groups down with it. (A `kill -9` of align
//! cannot be caught; on Linux the shell itself is then killed through `PR_SET_PDEATHSIG`, and
//! its children see their input and output pipes close.)

use std::io;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A `sh -c CMD` child leading its own process group, with piped stdin and stdout and
/// inherited stderr. Dropping it kills the group and reaps the shell.
pub struct GroupChild {
    child: Child,
    slot: Option<usize>,
    reaped: Option<ExitStatus>,
}

impl GroupChild {
    /// Start `sh -c cmd` in a new process group.
    pub fn spawn_shell(cmd: &str) -> io::Result<GroupChild> {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            c.process_group(0);
            #[cfg(target_os = "linux")]
            // SAFETY: the closure runs in the forked child before exec and only calls
            // async-signal-safe functions (prctl, getppid, _exit).
            unsafe {
                let parent = libc::getpid();
                c.pre_exec(move || {
                    // The shell gets SIGKILL if align dies without running its handlers.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
            signals::install();
        }
        let child = c.spawn()?;
        #[cfg(unix)]
        let slot = signals::register(child.id() as i32);
        #[cfg(not(unix))]
        let slot = None;
        Ok(GroupChild {
            child,
            slot,
            reaped: None,
        })
    }

    /// The process id of the shell, which is also its process group id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Waits until the shell has exited or `deadline` passes; true if it exited. The shell
    /// is not reaped, so its process group id cannot be reused before [`Self::finish`].
    pub fn wait_exit_until(&mut self, deadline: Instant) -> bool {
        loop {
            if self.has_exited() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(5)));
        }
    }

    #[cfg(unix)]
    fn has_exited(&mut self) -> bool {
        if self.reaped.is_some() {
            return true;
        }
        // SAFETY: waitid with WNOWAIT only inspects the child's state; `info` is plain data.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            // r < 0: no such child (already reaped elsewhere); treat as exited.
            r < 0 || info.si_pid() != 0
        }
    }

    #[cfg(not(unix))]
    fn has_exited(&mut self) -> bool {
        if self.reaped.is_some() {
            return true;
        }
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.reaped = Some(s);
                true
            }
            _ => false,
        }
    }

    /// Kills every process of the group (the shell and whatever it started).
    pub fn kill_group(&mut self) {
        if self.reaped.is_some() {
            return;
        }
        #[cfg(unix)]
        // SAFETY: kill(2) on our own child's process group; the shell is not reaped yet, so
        // the group id still names that group.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        #[cfg(not(unix))]
        let _ = self.child.kill();
    }

    /// Kills what is left of the group and reaps the shell; its exit status.
    pub fn finish(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.reaped {
            return Ok(s);
        }
        self.kill_group();
        let s = self.child.wait()?;
        self.reaped = Some(s);
        #[cfg(unix)]
        if let Some(slot) = self.slot.take() {
            signals::unregister(slot);
        }
        Ok(s)
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

#[cfg(unix)]
mod signals {
    //! The table of live process groups and the termination handler that kills them.
    use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
    use std::sync::Once;

    const SLOTS: usize = 64;
    static GROUPS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
    const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    /// The handler each signal had before ours (SIG_DFL or a plain handler function).
    static PREVIOUS: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];
    static INSTALL: Once = Once::new();

    pub fn register(pgid: i32) -> Option<usize> {
        (0..SLOTS).find(|&i| {
            GROUPS[i]
                .compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
    }

    pub fn unregister(slot: usize) {
        GROUPS[slot].store(0, Ordering::SeqCst);
    }

    extern "C" fn on_signal(sig: libc::c_int) {
        for g in &GROUPS {
            let pgid = g.load(Ordering::SeqCst);
            if pgid > 0 {
                // SAFETY: kill is async-signal-safe.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
        }
        let Some(i) = SIGNALS.iter().position(|&s| s == sig) else {
            return;
        };
        let prev = PREVIOUS[i].load(Ordering::SeqCst);
        // SAFETY: signal and raise are async-signal-safe. The signal is blocked while this
        // handler runs, so the re-raised one arrives with the default action on return.
        // A non-default previous value is the plain handler function that was installed.
        unsafe {
            if prev == libc::SIG_DFL {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
            } else {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(prev);
                f(sig);
            }
        }
    }

    /// Installs the handler for SIGTERM, SIGINT and SIGHUP once. Ignored signals stay
    /// ignored; a plain handler found in place is called after the groups are killed.
    pub fn install() {
        INSTALL.call_once(|| {
            for (i, &sig) in SIGNALS.iter().enumerate() {
                // SAFETY: reading and setting dispositions with zeroed, then filled, structs.
                unsafe {
                    let mut old: libc::sigaction = std::mem::zeroed();
                    if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                        || old.sa_sigaction == libc::SIG_IGN
                        || old.sa_flags & libc::SA_SIGINFO != 0
                    {
                        continue;
                    }
                    PREVIOUS[i].store(old.sa_sigaction, Ordering::SeqCst);
                    let mut new: libc::sigaction = std::mem::zeroed();
                    new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                    libc::sigemptyset(&mut new.sa_mask);
                    new.sa_flags = libc::SA_RESTART;
                    libc::sigaction(sig, &new, std::ptr::null_mut());
                }
            }
        });
    }
}
