//! seccomp-bpf allowlist applied to every VMM thread once the machine is set
//! up. After that point the VMM opens no file (everything it uses is an fd it
//! already holds), starts no thread or process, maps no executable memory and
//! issues only the ioctls its run loop and devices need. A disallowed call
//! kills the process (the supervisor sees SIGSYS), which is the safe failure.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(seccompiler::BackendError),
    #[error("cannot install the seccomp filter: {0}")]
    Apply(seccompiler::Error),
}

const KVMIO: u32 = 0xAE;
vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
vmm_sys_util::ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_bindings::kvm_irq_level);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_bindings::kvm_translation);
vmm_sys_util::ioctl_iow_nr!(TUNSETOFFLOAD, 0x54, 208, libc::c_uint);
vmm_sys_util::ioctl_iow_nr!(
    KVM_REGISTER_COALESCED_MMIO,
    KVMIO,
    0x67,
    kvm_bindings::kvm_coalesced_mmio_zone
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_UNREGISTER_COALESCED_MMIO,
    KVMIO,
    0x68,
    kvm_bindings::kvm_coalesced_mmio_zone
);

/// ioctl requests allowed after set-up: running vCPUs, the SCI line, the
/// registers and code address reported when a guest crashes, tap offloads
/// the guest negotiates, the console's isatty and non-blocking client sockets.
fn allowed_ioctls() -> [u64; 10] {
    [
        KVM_RUN(),
        // The serial port switches coalescing of its writes on and off.
        KVM_REGISTER_COALESCED_MMIO(),
        KVM_UNREGISTER_COALESCED_MMIO(),
        KVM_IRQ_LINE(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_TRANSLATE(),
        TUNSETOFFLOAD(),
        libc::TCGETS,
        libc::FIONBIO,
    ]
}

/// fcntl commands std uses on fds we hold (flags, CLOEXEC, `try_clone`).
const ALLOWED_FCNTL: [i32; 5] = [
    libc::F_GETFL,
    libc::F_SETFL,
    libc::F_GETFD,
    libc::F_SETFD,
    libc::F_DUPFD_CLOEXEC,
];

/// System calls the VMM uses after setup with no argument filter.
const ALLOWED: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_lseek,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_sigaltstack,
    libc::SYS_statx,
    libc::SYS_write,
    libc::SYS_writev,
];

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, Len::Qword, op, value).map_err(SeccompError::Build)
}

/// One rule per allowed value of argument `arg` (any of them matches).
fn one_of(
    arg: u8,
    values: impl IntoIterator<Item = u64>,
) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .into_iter()
        .map(|v| SeccompRule::new(vec![cond(arg, Op::Eq, v)?]).map_err(SeccompError::Build))
        .collect()
}

/// Memory may be mapped or re-protected, never executable.
fn no_exec(prot_arg: u8) -> Result<Vec<SeccompRule>, SeccompError> {
    let c = cond(prot_arg, Op::MaskedEq(libc::PROT_EXEC as u64), 0)?;
    Ok(vec![SeccompRule::new(vec![c]).map_err(SeccompError::Build)?])
}

/// The filter's rules, keyed by syscall number.
fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    rules.insert(libc::SYS_ioctl, one_of(1, allowed_ioctls())?);
    rules.insert(
        libc::SYS_fcntl,
        one_of(1, ALLOWED_FCNTL.iter().map(|&c| c as u64))?,
    );
    rules.insert(libc::SYS_mmap, no_exec(2)?);
    rules.insert(libc::SYS_mprotect, no_exec(2)?);
    // Signals only to our own threads (kicking vCPUs out of KVM_RUN).
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    rules.insert(libc::SYS_tgkill, one_of(0, [me as u64])?);
    Ok(rules)
}

/// The compiled filter, shared by all threads.
#[derive(Debug, Clone)]
pub struct Filters {
    program: BpfProgram,
}

impl Filters {
    /// Builds the filter for this process (its pid is part of the rules).
    pub fn build() -> Result<Self, SeccompError> {
        let filter = SeccompFilter::new(
            rules()?,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(SeccompError::Build)?;
        let program: BpfProgram = filter.try_into().map_err(SeccompError::Build)?;
        Ok(Self { program })
    }

    /// Installs the filter on the calling thread.
    pub fn apply(&self) -> Result<(), SeccompError> {
        seccompiler::apply_filter(&self.program).map_err(SeccompError::Apply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles() {
        assert!(!Filters::build().unwrap().program.is_empty());
    }

    /// A raw system call: number and six arguments.
    type Call = (libc::c_long, [u64; 6]);

    /// Makes `calls` in a forked child under the filter; returns the signal
    /// that killed the child, or 0 when every call returned.
    fn under_filter(calls: &[Call]) -> i32 {
        let filters = Filters::build().unwrap();
        // SAFETY: the child only installs the prebuilt filter, makes raw
        // syscalls and _exits; it allocates nothing.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if filters.apply().is_err() {
                // SAFETY: leaving the forked child at once.
                unsafe { libc::_exit(3) };
            }
            for (nr, a) in calls {
                // SAFETY: raw syscalls with valid or null pointer arguments in
                // a forked child; the point is whether the filter lets them
                // through (their own result does not matter).
                unsafe { libc::syscall(*nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
            }
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        if libc::WIFSIGNALED(status) {
            libc::WTERMSIG(status)
        } else {
            assert_eq!(
                libc::WEXITSTATUS(status),
                0,
                "child could not install the filter"
            );
            0
        }
    }

    #[test]
    fn forbidden_calls_kill_and_allowed_ones_pass() {
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let mmap = |prot: i32| (libc::SYS_mmap, [0, 4096, prot as u64, anon, u64::MAX, 0]);
        let path = c"/etc/hostname".as_ptr() as u64;
        let cases: &[(&str, &[Call], i32)] = &[
            (
                "openat",
                &[(libc::SYS_openat, [libc::AT_FDCWD as u64, path, 0, 0, 0, 0])],
                libc::SIGSYS,
            ),
            (
                "executable mmap",
                &[mmap(libc::PROT_READ | libc::PROT_EXEC)],
                libc::SIGSYS,
            ),
            (
                "an ioctl outside the list",
                &[(libc::SYS_ioctl, [0, libc::TIOCSTI, 0, 0, 0, 0])],
                libc::SIGSYS,
            ),
            (
                "a signal to another process",
                &[(libc::SYS_tgkill, [1, 1, 0, 0, 0, 0])],
                libc::SIGSYS,
            ),
            (
                "plain memory, an allowed ioctl, getpid",
                &[
                    mmap(libc::PROT_READ | libc::PROT_WRITE),
                    (libc::SYS_ioctl, [0, libc::TCGETS, 0, 0, 0, 0]),
                    (libc::SYS_getpid, [0; 6]),
                ],
                0,
            ),
            (
                "the console: accepting, sending, epoll, the ring (on a bad fd)",
                &[
                    (libc::SYS_accept4, [u64::MAX, 0, 0, 0x80000, 0, 0]),
                    (libc::SYS_sendmsg, [u64::MAX, 0, 0x4000, 0, 0, 0]),
                    (libc::SYS_epoll_ctl, [u64::MAX, 3, u64::MAX, 0, 0, 0]),
                    (libc::SYS_pwrite64, [u64::MAX, 0, 0, 0, 0, 0]),
                ],
                0,
            ),
        ];
        for (what, calls, signal) in cases {
            assert_eq!(under_filter(calls), *signal, "{what}");
        }
    }

    #[test]
    fn nothing_that_opens_executes_or_spawns_is_allowed() {
        let rules = rules().unwrap();
        for nr in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_ptrace,
            libc::SYS_kill,
            libc::SYS_mount,
            libc::SYS_chroot,
            libc::SYS_setuid,
        ] {
            assert!(!rules.contains_key(&nr), "syscall {nr} must not be allowed");
        }
        assert_eq!(rules[&libc::SYS_ioctl].len(), allowed_ioctls().len());
        assert!(
            !rules[&libc::SYS_mmap].is_empty(),
            "mmap is argument-filtered"
        );
        assert!(
            !rules[&libc::SYS_mprotect].is_empty(),
            "mprotect is argument-filtered"
        );
    }
}
