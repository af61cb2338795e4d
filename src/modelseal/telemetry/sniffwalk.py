"""The two formats ``sniff`` decides by walking their structure, as their loaders do: a pickle
(protocols 0 to 5, one opcode after another) and an ONNX ``ModelProto`` (protobuf fields in
any order). Pure apart from the bounded read callback behind a ``Window``.

A ``Window`` serves the bytes of a file: the prefix the caller already read, and, once the
first bytes look like the format (``deepen``), at most ``DEEP_READS`` further reads of at most
``DEEP_PAGE`` bytes each at the offsets the walk reaches. A length-delimited field or a long
string argument is skipped by its length (checked against the file size), never read: a
``doc_string`` or a padding string longer than the prefix does not hide what follows it.

Pickle: opcodes from ``pickletools``' table, arguments parsed by its readers (nothing is
executed, no object is built). A pickle is a run of at least ``MIN_OPS`` valid opcodes, in
one pickle or several in a row (torch's legacy format), that reaches what model pickles hold:
a ``GLOBAL``/``STACK_GLOBAL``/``INST`` of a module of ``MODEL_MODULES``, or a dict filled by
``SETITEM(S)``, or a ``REDUCE``/``BUILD`` of a global; an invalid opcode after that, or the
window ending mid-stream, does not undo it. ONNX: every top-level field has a valid tag,
``ModelProto``'s field numbers have their own wire types (unknown numbers are tolerated, fewer
than the known ones), lengths fit the file, an ``ir_version`` (1 to ``MAX_IR_VERSION``) and a
``graph`` or ``opset_import`` whose first inner tag is one of theirs are present, and the
walk ends exactly at the end of the file (or at the end of the window's budget).
"""

from __future__ import annotations

import io
import pickletools
import re
import warnings
from collections.abc import Callable

Read = Callable[[int, int], bytes]  # (offset, length) -> at most length bytes
DEEP_READS = 16
DEEP_PAGE = 64 << 10


class Window:
    """Bytes of a file of ``size`` bytes: ``prefix``, and bounded reads past it once deepened."""

    def __init__(self, prefix: bytes, size: int, read: Read | None) -> None:
        self.prefix, self.size, self._read = prefix, size, read
        self.deep = False
        self.reads = 0
        self._pages: dict[int, bytes] = {}

    def deepen(self) -> bool:
        """Allow reads past the prefix (once the first bytes look like a format); False if
        there is no read callback."""
        self.deep = self._read is not None
        return self.deep

    def get(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``: fewer at the end of the file, or where the window
        may not read (not deepened, or its budget spent)."""
        end = min(offset + n, self.size)
        if offset < 0 or offset >= end:
            return b""
        if end <= len(self.prefix):
            return self.prefix[offset:end]
        out = self.prefix[offset:end] if offset < len(self.prefix) else b""
        pos = offset + len(out)
        while pos < end:
            page = self._page(pos // DEEP_PAGE)
            if not page:
                break
            start = pos - (pos // DEEP_PAGE) * DEEP_PAGE
            piece = page[start : start + end - pos]
            if not piece:
                break
            out += piece
            pos += len(piece)
        return out

    def _page(self, index: int) -> bytes:
        if index in self._pages:
            return self._pages[index]
        if not self.deep or self._read is None or self.reads >= DEEP_READS:
            return b""
        self.reads += 1
        self._pages[index] = data = self._read(index * DEEP_PAGE, DEEP_PAGE)
        return data


def varint(data: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(data) and shift < 64:
        b = data[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7
    return None


# -- pickle ----------------------------------------------------------------------------------------

MIN_OPS = 8
MAX_OPS = 4096
MODEL_MODULES = (
    "torch",
    "numpy",
    "collections",
    "_codecs",
    "sklearn",
    "scipy",
    "joblib",
    "pandas",
    "tensorflow",
    "keras",
    "transformers",
    "xgboost",
    "lightgbm",
)
_OPS = {op.code: op for op in pickletools.opcodes}
_LENGTH = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4}
_LENGTH.update({pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8})
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "UNICODE", "STRING"}
_LINE_MAX = 1024  # a text argument (protocol 0) longer than this is not a model pickle's
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ARG_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError)


def _model_module(name: object) -> bool:
    return isinstance(name, str) and name.split(".", 1)[0] in MODEL_MODULES


class _PickleWalk:
    def __init__(self, win: Window) -> None:
        self.win = win
        self.ops = 0
        self.model_global = self.any_global = self.dict_ = self.setitem = self.reduce = False
        self.strings: list[object] = []  # the last strings pushed (STACK_GLOBAL's module and name)
        self.depth = 0  # objects on the stack above the topmost mark
        self.marks: list[int] = []  # the depth below each mark
        self.memo: set[int] = set()

    def plausible(self) -> bool:
        structure = (self.dict_ and self.setitem) or (self.any_global and self.reduce)
        return self.ops >= MIN_OPS and (self.model_global or structure)

    def step(self, pos: int) -> int | None:
        """Parse the opcode at ``pos``: the position after it, or None (invalid, or the
        window ends)."""
        code = self.win.get(pos, 1)
        op = _OPS.get(code.decode("latin-1")) if code else None
        if op is None:
            return None
        pos += 1
        arg: object = None
        a = op.arg
        if a is None:
            pass
        elif a.n in _LENGTH:
            width = _LENGTH[a.n]
            raw = self.win.get(pos, width)
            if len(raw) != width:
                return None
            length = int.from_bytes(raw, "little", signed=a.n == pickletools.TAKEN_FROM_ARGUMENT4)
            pos += width
            if length < 0 or pos + length > self.win.size:
                return None  # what pickle.load would trip over too
            if op.name in _STRINGS and length <= 256:
                data = self.win.get(pos, length)
                arg = data.decode("utf-8", "replace") if len(data) == length else None
            pos += length
        else:
            want = a.n if a.n >= 0 else 2 * _LINE_MAX
            data = self.win.get(pos, want)
            f = io.BytesIO(data)
            try:
                arg = a.reader(f)
            except _ARG_ERRORS:
                return None
            pos += f.tell()
        return self._effect(op, arg, pos)

    def _stack(self, op: pickletools.OpcodeInfo) -> bool:
        """Apply ``op``'s stack effect as ``pickle.load`` would; False if it cannot run."""
        before, after = op.stack_before, op.stack_after
        if op.name == "POP" and self.depth == 0 and self.marks:
            self.depth = self.marks.pop()  # pickle.load's POP takes a mark off an empty stack
            return True
        need = len(before)
        if pickletools.markobject in before:
            if not self.marks:
                return False
            self.depth = self.marks.pop()  # everything above the mark is consumed
            need = before.index(pickletools.markobject)
        if self.depth < need:
            return False
        self.depth -= need
        if pickletools.markobject in after:
            self.marks.append(self.depth)
            self.depth = 0
        else:
            self.depth += len(after)
        return True

    def _memo(self, name: str, arg: object) -> bool:
        if name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int):
            self.memo.add(arg)
        elif name == "MEMOIZE":
            self.memo.add(len(self.memo))
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            return arg in self.memo
        return True

    def _effect(self, op: pickletools.OpcodeInfo, arg: object, pos: int) -> int | None:
        name = op.name
        if name == "PROTO" and not (isinstance(arg, int) and arg <= 5):
            return None
        if not self._stack(op) or not self._memo(name, arg):
            return None
        if name == "STOP":  # the next pickle of a run (torch's legacy format) starts afresh
            self.depth, self.marks, self.memo = 0, [], set()
        self.ops += 1
        if name in _STRINGS:
            self.strings = [*self.strings[-1:], arg]
        elif name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ") if isinstance(arg, str) else ("", "", "")
            if not (_DOTTED.fullmatch(module) and _DOTTED.fullmatch(attr)):
                return None  # what find_class would refuse
            self.any_global = True
            self.model_global |= _model_module(module)
        elif name == "STACK_GLOBAL":
            self.any_global = True
            self.model_global |= len(self.strings) == 2 and _model_module(self.strings[0])
        elif name in ("EMPTY_DICT", "DICT"):
            self.dict_ = True
        elif name in ("SETITEM", "SETITEMS"):
            self.setitem |= self.dict_  # a dict filled, in that order
        elif name in ("REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "OBJ"):
            self.reduce |= self.any_global  # an object built from a global, in that order
        return pos


def is_pickle(win: Window) -> bool:
    """Whether the file is a pickle (see the module doc)."""
    with warnings.catch_warnings():  # the STRING reader decodes escapes: noise makes bad ones
        warnings.simplefilter("ignore")
        return _is_pickle(win)


def _is_pickle(win: Window) -> bool:
    walk = _PickleWalk(win)
    pos: int | None = 0
    lead = win.prefix[:1] == b"\x80"  # PROTO: protocol 2 and later
    while pos is not None and pos < win.size and walk.ops < MAX_OPS:
        if walk.plausible():
            return True
        near_end = not win.deep and len(win.prefix) < win.size and pos + 2 * _LINE_MAX + 16 > len(win.prefix)
        if near_end and (walk.ops >= 3 or (lead and walk.ops >= 1)):
            win.deepen()  # the prefix ends within the next opcode's reach, and it looks like a pickle so far
        pos = walk.step(pos)
    return walk.plausible()


# -- ONNX (a protobuf ModelProto) -----------------------------------------------------------------

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
MODEL_FIELDS = {1: _VARINT, 2: _LEN, 3: _LEN, 4: _LEN, 5: _VARINT, 6: _LEN, 7: _LEN, 8: _LEN}
MODEL_FIELDS.update({14: _LEN, 20: _LEN, 25: _LEN, 26: _LEN})
_TEXT_FIELDS = (2, 3, 4, 6)  # producer name and version, domain, doc string
# The first tag inside a graph (GraphProto: node, name, initializer, doc_string, input, output,
# value_info, quantization_annotation, sparse_initializer, metadata_props) or inside an opset
# import (OperatorSetIdProto: domain, version).
_FIRST_INNER = {7: (0x0A, 0x12, 0x2A, 0x52, 0x5A, 0x62, 0x6A, 0x72, 0x7A, 0x82), 8: (0x0A, 0x10)}
MAX_IR_VERSION = 32  # onnx 1.23 writes 14
MAX_FIELDS = 4096


def is_onnx(win: Window) -> bool:
    """Whether the file is an ONNX ModelProto (see the module doc)."""
    pos, known, unknown, ir, structure = 0, 0, 0, False, False
    for _ in range(MAX_FIELDS):
        if pos == win.size:
            break
        head = win.get(pos, 20)
        if len(head) < min(20, win.size - pos):  # the window ends here
            if win.deep or not (known and (ir or structure)) or not win.deepen():
                return win.deep and ir and structure and unknown < known
            head = win.get(pos, 20)
            if not head:
                return ir and structure and unknown < known
        tag = varint(head, 0)
        if tag is None:
            return False
        field, wire = tag[0] >> 3, tag[0] & 7
        expected = MODEL_FIELDS.get(field)
        if field == 0 or wire not in (_VARINT, _I64, _LEN, _I32) or (expected is not None and expected != wire):
            return False
        known, unknown = known + (expected is not None), unknown + (expected is None)
        start = tag[1]
        if wire == _VARINT:
            value = varint(head, start)
            if value is None:
                return False
            if field == 1:
                if not 1 <= value[0] <= MAX_IR_VERSION:
                    return False
                ir = True
            pos += value[1]
        elif wire in (_I64, _I32):
            pos += start + (8 if wire == _I64 else 4)
        else:
            value = varint(head, start)
            if value is None:
                return False
            length, body = value[0], pos + value[1]
            if body + length > win.size:
                return False
            if field in _FIRST_INNER and length:
                first = win.get(body, 1)
                if first and first[0] not in _FIRST_INNER[field]:
                    return False
                structure = True
            if field in _TEXT_FIELDS and body + length <= len(win.prefix):
                try:
                    win.prefix[body : body + length].decode("utf-8")
                except UnicodeDecodeError:
                    return False
            pos = body + length
        if pos > win.size:
            return False
    else:
        return ir and structure and unknown < known and win.deep
    return ir and structure and unknown < known


__all__ = ["DEEP_PAGE", "DEEP_READS", "MIN_OPS", "MODEL_MODULES", "Read", "Window", "is_onnx", "is_pickle", "varint"]
