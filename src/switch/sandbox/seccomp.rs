//! `allow_user_namespaces = false`: a tiny classic-BPF seccomp filter that refuses creating or
//! entering user namespaces, installed in the payload process after no_new_privs.
//!
//! Only this one purpose: `unshare` and `clone` with CLONE_NEWUSER get EPERM, `clone3` gets
//! ENOSYS (its flags live in memory a filter cannot read; libc then falls back to `clone`),
//! `setns` gets EPERM (without capabilities it can only enter user namespaces), and syscalls
//! of a foreign ABI (x32, i386 on x86_64) get ENOSYS so the filter cannot be bypassed through
//! them. Everything else is allowed.

use std::io;

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
/// BPF_LD (0x00) | BPF_W (0x00) | BPF_ABS (0x20).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

// struct seccomp_data offsets: nr (u32) 0, arch (u32) 4, ip (u64) 8, args[6] (u64) 16.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of args[0] (little-endian targets only; see the cfg below).
const OFF_ARG0_LO: u32 = 16;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64

/// x32 syscalls share AUDIT_ARCH_X86_64 but have this bit set in nr.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Installs the filter in the calling thread (and everything it execs or forks).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) fn deny_user_namespaces() -> io::Result<()> {
    let allow = libc::SECCOMP_RET_ALLOW;
    let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    let newuser = libc::CLONE_NEWUSER as u32;
    let prog = [
        /* 0 */ ins(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
        /* 1 */ ins(BPF_JMP_JEQ_K, 1, 0, AUDIT_ARCH),
        /* 2 */ ins(BPF_RET_K, 0, 0, enosys),
        /* 3 */ ins(BPF_LD_W_ABS, 0, 0, OFF_NR),
        /* 4 */ ins(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        /* 5 */ ins(BPF_RET_K, 0, 0, enosys),
        /* 6 */ ins(BPF_JMP_JEQ_K, 6, 0, libc::SYS_unshare as u32),
        /* 7 */ ins(BPF_JMP_JEQ_K, 5, 0, libc::SYS_clone as u32),
        /* 8 */ ins(BPF_JMP_JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        /* 9 */ ins(BPF_RET_K, 0, 0, enosys),
        /* 10 */ ins(BPF_JMP_JEQ_K, 0, 1, libc::SYS_setns as u32),
        /* 11 */ ins(BPF_RET_K, 0, 0, eperm),
        /* 12 */ ins(BPF_RET_K, 0, 0, allow),
        // unshare / clone: inspect flags
        /* 13 */
        ins(BPF_LD_W_ABS, 0, 0, OFF_ARG0_LO),
        /* 14 */ ins(BPF_JMP_JSET_K, 0, 1, newuser),
        /* 15 */ ins(BPF_RET_K, 0, 0, eperm),
        /* 16 */ ins(BPF_RET_K, 0, 0, allow),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel copies the program.
    // no_new_privs is already set, so an unprivileged process may install it.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const libc::sock_fprog as libc::c_ulong,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Other architectures: refuse rather than run without the requested restriction.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) fn deny_user_namespaces() -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "allow_user_namespaces = false is only implemented on x86_64 and aarch64",
    ))
}
