"""The seccomp filter applied to every process in every sandbox (compiled with libseccomp).

Allow by default and deny the kernel surface a sandbox has no use for and that has a history of
escapes: keyrings, BPF, io_uring (invisible to seccomp once open), namespaces and mounts, module
and clock and reboot calls. Calls libc falls back from (clone3, the new mount API) get ENOSYS.
"""

from __future__ import annotations

import errno
import os

import pyseccomp as sc

DENY_EPERM = (
    "keyctl add_key request_key userfaultfd perf_event_open bpf fanotify_init "
    "io_uring_setup io_uring_enter io_uring_register syslog acct quotactl uselib modify_ldt "
    "move_pages mbind set_mempolicy migrate_pages kexec_load kexec_file_load init_module "
    "finit_module delete_module reboot swapon swapoff iopl ioperm settimeofday clock_settime "
    "clock_adjtime adjtimex process_vm_writev kcmp pidfd_getfd unshare setns mount umount2 "
    "pivot_root chroot"
).split()
DENY_ENOSYS = "clone3 open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr".split()

CLONE_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
AF_VSOCK = 40
# personality(2): only what Docker allows (PER_LINUX, PER_LINUX32, UNAME26 and their mix, and
# the 0xffffffff query); the rest (ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, ...) weakens the process.
PERSONALITY_BITS = 0x00020008
TOP_BIT = 0x80000000


def build_filter() -> bytes:
    """The compiled BPF program, as bwrap's --add-seccomp-fd reads it."""
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    # Other ABIs on x86-64 (int 0x80, x32) get the same rules instead of a way around them.
    for arch in (sc.Arch.X86, sc.Arch.X32):
        f.add_arch(arch)
    eperm = sc.ERRNO(errno.EPERM)
    for name in DENY_EPERM:
        f.add_rule(eperm, name)
    for name in DENY_ENOSYS:
        f.add_rule(sc.ERRNO(errno.ENOSYS), name)
    for flag in CLONE_NAMESPACE_FLAGS:
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # Compare only the low 32 bits: a 64-bit compare reopens CVE-2019-10063.
    for request in (TIOCSTI, TIOCLINUX):
        f.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.EQ, AF_VSOCK))
    for bit in range(31):
        flag = 1 << bit
        # With the top bit clear, any flag outside the allowed ones is refused...
        if not flag & PERSONALITY_BITS:
            f.add_rule(eperm, "personality", sc.Arg(0, sc.MASKED_EQ, flag | TOP_BIT, flag))
        # ...and with it set, only the all-ones query passes.
        f.add_rule(eperm, "personality", sc.Arg(0, sc.MASKED_EQ, flag | TOP_BIT, TOP_BIT))
    with open(os.memfd_create("corral-seccomp"), "w+b") as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()
