"""The syzkaller description (kmod/syz/dev_kvmlu.txt) covers the whole uAPI header.

Only text is read: the header, the description and the kernel's dispatch tables. Every
ioctl of the header must be described on the file descriptor its command number range
belongs to, nothing more may be described, and every structure of the header must be
described with the same fields in the same order. No syzkaller and no kernel needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "kmod/include/uapi/linux/kvmlu.h"
SYZ = ROOT / "kmod/syz/dev_kvmlu.txt"
KMOD = ROOT / "kmod"

# The resource a command is issued on, by the enumerator that starts its range
# (device 0x00.., table 0x20.., binding 0x40.., session 0x60.., and the vAPIC
# modules' device 0x80.. and vAPIC objects 0xA0..). Every *_CMD_BASE of the
# header must be listed here.
RANGE_RESOURCES = {
    "KVMLU_CMD_BASE": "fd_kvmlu",
    "KVMLU_TABLE_CMD_BASE": "fd_kvmlu_table",
    "KVMLU_BINDING_CMD_BASE": "fd_kvmlu_binding",
    "KVMLU_SESSION_CMD_BASE": "fd_kvmlu_session",
    "KVMLU_VAPIC_DEV_CMD_BASE": "fd_kvmlu_vapic_dev",
    "KVMLU_VAPIC_CMD_BASE": "fd_kvmlu_vapic",
}

IOCTL_RE = re.compile(
    r"^#define\s+(KVMLU_\w+)\s+_IO(?:R|W|WR)?\(\s*KVMLU_IOCTL_TYPE\s*,\s*(\w+)\s*[,)]", re.M
)
ENUM_RE = re.compile(r"\benum\b[^{};]*\{(.*?)\}\s*;", re.S)
C_STRUCT_RE = re.compile(r"^struct\s+(kvmlu_\w+)\s*\{(.*?)^\}\s*;", re.M | re.S)
C_DECLARATOR_RE = re.compile(r"(\w+)\s*(?:\[[^\]]*\]\s*)*(?::\s*\w+\s*)?$")
SYZ_IOCTL_RE = re.compile(r"^ioctl\$(\w+)((?:\$\w+)?)\((.*)\)[^()]*$", re.M)
SYZ_STRUCT_RE = re.compile(r"^(kvmlu_\w+)((?:\$\w+)?)\s*\{[ \t]*\n(.*?)^\}", re.M | re.S)
SYZ_ARG_RE = re.compile(r"(\w+)\s+(.*)", re.S)
SYZ_CONST_RE = re.compile(r"const\[\s*(\w+)\s*\]")
SYZ_PTR_RE = re.compile(r"ptr(?:64)?\[\s*(?:in|out|inout)\s*,\s*(\w+)((?:\$\w+)?)\s*\]")
KERNEL_OP_RE = re.compile(
    r"KVMLU_IOCTL_OP\(\s*\w+\s*,\s*(KVMLU_\w+)\s*,\s*\w+\s*,\s*struct\s+(kvmlu_\w+)\s*,"
)


def strip_c_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", " ", text, flags=re.S))


@cache
def header_text() -> str:
    return strip_c_comments(HEADER.read_text())


@cache
def syz_text() -> str:
    assert SYZ.is_file(), f"{SYZ.relative_to(ROOT)} is missing"
    return SYZ.read_text()


def header_ioctls() -> dict[str, str]:
    """Each ioctl of the header and the KVMLU_CMD_* constant of its number."""
    found = dict(IOCTL_RE.findall(header_text()))
    assert found, f"no '#define KVMLU_X _IO(KVMLU_IOCTL_TYPE, ...)' found in {HEADER}"
    return found


def header_enums() -> dict[str, int]:
    """The values of every enumerator of the header: literals, references, implicit."""
    values: dict[str, int] = {}
    for body in ENUM_RE.findall(header_text()):
        following = 0
        for raw in body.split(","):
            item = " ".join(raw.split())
            if not item:
                continue
            m = re.fullmatch(r"(\w+)(?: ?= ?(\w+))?", item)
            assert m, f"cannot parse the enumerator {item!r} in {HEADER.name}"
            name, expr = m.groups()
            if expr is None:
                value = following
            elif expr in values:
                value = values[expr]
            else:
                assert re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", expr), (
                    f"cannot evaluate {name} = {expr} in {HEADER.name}"
                )
                value = int(expr, 0)
            values[name] = value
            following = value + 1
    return values


def expected_resources() -> dict[str, str]:
    """Each ioctl of the header and the resource its command number's range belongs to."""
    enums = header_enums()
    missing = sorted(set(RANGE_RESOURCES) - set(enums))
    assert not missing, f"the header no longer defines the range bases {missing}"
    unmapped = sorted(n for n in enums if n.endswith("_CMD_BASE") and n not in RANGE_RESOURCES)
    assert not unmapped, f"new command ranges {unmapped}: add their resources to RANGE_RESOURCES"
    bases = sorted((enums[base], resource) for base, resource in RANGE_RESOURCES.items())
    expected = {}
    for ioctl, cmd in header_ioctls().items():
        if re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", cmd):
            number = int(cmd, 0)
        else:
            assert cmd in enums, f"{ioctl} uses {cmd}, which no enum of the header defines"
            number = enums[cmd]
        below = [resource for start, resource in bases if start <= number]
        assert below, f"{ioctl} ({cmd} = {number:#x}) is below every command range"
        expected[ioctl] = below[-1]
    return expected


def header_structs() -> dict[str, list[str]]:
    """The field names of each struct kvmlu_* of the header, in order."""
    structs = {}
    for name, body in C_STRUCT_RE.findall(header_text()):
        assert "{" not in body, f"struct {name}: nested definitions are beyond this parser"
        fields = []
        for declaration in body.split(";"):
            for declarator in declaration.split(","):
                text = declarator.strip()
                if not text:
                    continue
                m = C_DECLARATOR_RE.search(text)
                assert m, f"struct {name}: cannot find the field name in {text!r}"
                fields.append(m.group(1))
        structs[name] = fields
    assert structs, f"no 'struct kvmlu_* {{ ... }};' found in {HEADER}"
    return structs


def split_args(text: str) -> list[str]:
    """Split a syzkaller argument list at the commas outside brackets."""
    args, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
    args.append(text[start:].strip())
    return [a for a in args if a]


@dataclass(frozen=True)
class SyzIoctl:
    """One ioctl$KVMLU_X[$variant](fd TYPE, cmd const[KVMLU_X], arg ptr[DIR, STRUCT]) line."""

    name: str
    variant: str
    fd_type: str
    cmd: str | None
    arg_struct: str | None
    line: str


def syz_ioctls() -> list[SyzIoctl]:
    found = []
    for m in SYZ_IOCTL_RE.finditer(syz_text()):
        name, variant, arglist = m.groups()
        args = [SYZ_ARG_RE.fullmatch(a) for a in split_args(arglist)]
        assert args and all(args), f"cannot parse the arguments of: {m.group(0)}"
        types = [a.group(2).strip() for a in args if a]
        cmd = SYZ_CONST_RE.fullmatch(types[1]) if len(types) > 1 else None
        ptr = SYZ_PTR_RE.fullmatch(types[2]) if len(types) > 2 else None
        found.append(
            SyzIoctl(
                name=name,
                variant=variant,
                fd_type=types[0],
                cmd=cmd.group(1) if cmd else None,
                arg_struct=ptr.group(1) + ptr.group(2) if ptr else None,
                line=m.group(0),
            )
        )
    return found


def syz_structs() -> dict[str, list[str]]:
    """The field names of each kvmlu_*[$variant] { ... } struct of the description."""
    structs = {}
    for name, variant, body in SYZ_STRUCT_RE.findall(syz_text()):
        fields = []
        for line in body.splitlines():
            words = line.split()
            if words and not words[0].startswith("#"):
                fields.append(words[0])
        structs[name + variant] = fields
    return structs


def test_every_header_ioctl_is_described() -> None:
    described = {(i.name, i.variant): i for i in syz_ioctls()}
    missing = [f"ioctl${name}(" for name in header_ioctls() if (name, "") not in described]
    assert not missing, f"{SYZ.name} has no line for: {', '.join(missing)}"
    wrong_cmd = [i.line for i in syz_ioctls() if i.cmd != i.name]
    assert not wrong_cmd, "cmd must be const[<the ioctl's own name>] in:\n" + "\n".join(wrong_cmd)


def test_no_ioctl_beyond_the_header() -> None:
    header = header_ioctls()
    extra = sorted({i.name for i in syz_ioctls()} - set(header))
    assert not extra, f"{SYZ.name} describes ioctls the header lacks: {', '.join(extra)}"


def test_ioctls_are_issued_on_the_right_resource() -> None:
    expected = expected_resources()
    wrong = [
        f"ioctl${i.name}{i.variant}: fd is {i.fd_type}, expected {expected[i.name]}"
        for i in syz_ioctls()
        if i.name in expected and i.fd_type != expected[i.name]
    ]
    assert not wrong, "ioctls described on the wrong file descriptor:\n" + "\n".join(wrong)


def test_structs_have_the_header_fields_in_order() -> None:
    """Every struct kvmlu_* of the header is an ioctl argument or part of one (nested, or
    behind a pointer such as LIST_SESSIONS' entries or VAPIC_LOAD's buf), so each must be
    described, as kvmlu_x or as variants kvmlu_x$y, all with the header's fields."""
    described = syz_structs()
    problems = []
    for name, fields in header_structs().items():
        variants = {n: f for n, f in described.items() if n.split("$")[0] == name}
        if not variants:
            problems.append(f"struct {name} is not described (fields: {', '.join(fields)})")
        for syz_name, syz_fields in variants.items():
            if syz_fields != fields:
                problems.append(f"{syz_name}: fields {syz_fields}, header has {fields}")
    assert not problems, "descriptions out of step with the header:\n" + "\n".join(problems)


def test_every_ioctl_argument_is_a_header_struct() -> None:
    header = header_structs()
    described = syz_structs()
    bad = [i.line for i in syz_ioctls() if i.arg_struct is None]
    assert not bad, "the argument must be ptr[DIR, kvmlu_struct] in:\n" + "\n".join(bad)
    wrong = [
        f"ioctl${i.name}{i.variant}: {i.arg_struct}"
        for i in syz_ioctls()
        if i.arg_struct not in described or str(i.arg_struct).split("$")[0] not in header
    ]
    assert not wrong, "arguments that are no described header struct:\n" + "\n".join(wrong)


def test_ioctl_arguments_match_the_kernel_dispatch_tables() -> None:
    """Each ioctl takes the structure its KVMLU_IOCTL_OP() entry in kmod/*.c copies in."""
    kernel: dict[str, str] = {}
    for source in sorted(KMOD.glob("*.c")):
        kernel.update(KERNEL_OP_RE.findall(source.read_text()))
    assert kernel, f"no KVMLU_IOCTL_OP(base, KVMLU_X, fn, struct kvmlu_y, last) in {KMOD}/*.c"
    wrong = [
        f"ioctl${i.name}{i.variant}: {i.arg_struct}, the kernel copies struct {kernel[i.name]}"
        for i in syz_ioctls()
        if i.name in kernel and (i.arg_struct or "").split("$")[0] != kernel[i.name]
    ]
    assert not wrong, "ioctl arguments differ from the kernel's:\n" + "\n".join(wrong)


def test_resources_chain() -> None:
    """Each object resource is declared, produced by an output and consumed as an input."""
    text = syz_text()
    for resource in [*RANGE_RESOURCES.values(), "kvmlu_token"]:
        assert re.search(rf"^resource {resource}\[\w+\]", text, re.M), f"no resource {resource}"
        produced = re.search(
            rf"\) {resource}$|^\t\w+\t+{resource}\t+\((?:out|inout)\)$", text, re.M
        )
        assert produced, f"nothing produces {resource}: no call returns it, no field outputs it"
        consumed = re.search(
            rf"\(fd {resource},|, fd {resource},|^\t\w+\t+{resource}(?:\t+\((?:in|inout)\))?$",
            text,
            re.M,
        )
        assert consumed, f"nothing consumes {resource}: no call or input field takes it"
