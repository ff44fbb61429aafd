"""The compiler's program representation: commands as objects over symbolic DRAM buffers.

Lowerings (:mod:`.gemm`, and the layer lowerings built on it) do not write bytes. They create
:class:`Buffer` objects (operands, weights, scales, outputs, scratch) in a :class:`Program` and
append :class:`Command` objects whose DRAM address fields are :class:`Ref` (a buffer plus a
byte offset). Then, as separate small passes:

1. :meth:`Program.verify_tokens` — token balance in program order, per counter
   (:data:`fp8npu.hdl.isa.Token`): a pop only where an earlier command pushed (so the in-order
   dispatcher can never deadlock, whatever the queue depth), never above
   :data:`~fp8npu.hdl.isa.TOKEN_LIMIT`, and zero at the end;
2. :func:`allocate` — DRAM addresses for the buffers (:class:`Layout`): aligned, first fit,
   buffers whose lifetimes (the commands that use them) do not overlap may share bytes;
3. :meth:`Program.verify` — with a layout: every command passes :func:`fp8npu.hdl.isa.validate`
   against the window, and every DRAM access stays inside the buffer it names;
4. :meth:`Program.encode` — the command bytes.

Every failure is a :class:`VerifyError` naming the command (its index and its ``note``, which
says which operation emitted it).
"""

from dataclasses import dataclass, field

from fp8npu.hdl import isa
from fp8npu.hdl.isa import ErrorCode, Opcode, Token

__all__ = ["Buffer", "Ref", "Command", "Program", "Layout", "VerifyError", "allocate", "ALIGN"]

#: Alignment of every buffer (a command is 32 bytes; at least the widest bus).
ALIGN = 32

#: DRAM address fields of the commands that have them.
_DRAM_FIELDS = {Opcode.LOAD: ("dram_addr",), Opcode.STORE: ("dram_addr",)}

#: Kinds of buffer: what the host does with it.
KINDS = ("const", "input", "output", "scratch", "program")


class VerifyError(ValueError):
    """A program the hardware would refuse or that would misbehave; the message says where."""


@dataclass(eq=False)
class Buffer:
    """A named DRAM buffer.

    ``kind``: ``const`` (contents known at compile time: weights, scales; ``data`` holds them),
    ``input`` (written by the host before a run), ``output`` (read by the host after it),
    ``scratch`` (only the NPU uses it), ``program`` (commands). ``meta`` carries what a host
    needs to fill or read it (for example its layout).
    """

    name: str
    nbytes: int
    kind: str = "scratch"
    data: bytes = None
    align: int = ALIGN
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"buffer kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.data is not None:
            self.data = bytes(self.data)
            if len(self.data) != self.nbytes:
                raise ValueError(f"buffer {self.name}: {len(self.data)} bytes of data for {self.nbytes} bytes")

    def __add__(self, offset):
        return Ref(self, offset)

    def __repr__(self):
        return f"Buffer({self.name!r}, {self.nbytes}, {self.kind})"


@dataclass(frozen=True, eq=False)
class Ref:
    """``offset`` bytes into ``buffer``: a symbolic DRAM address."""

    buffer: Buffer
    offset: int = 0

    def __add__(self, offset):
        return Ref(self.buffer, self.offset + int(offset))

    def __repr__(self):
        return f"{self.buffer.name}+{self.offset:#x}"


@dataclass(eq=False)
class Command:
    """One command: opcode, token flags and fields; DRAM addresses may be :class:`Ref`."""

    op: Opcode
    fields: dict
    note: str = ""

    def __post_init__(self):
        if self.op in _DRAM_FIELDS:
            self.fields = {k: (Ref(v) if isinstance(v, Buffer) else v) for k, v in self.fields.items()}

    def refs(self):
        """The (field, Ref) pairs of this command (only LOAD and STORE address DRAM)."""
        if self.op not in _DRAM_FIELDS:
            return ()
        return [(name, v) for name, v in self.fields.items() if isinstance(v, Ref)]

    def resolve(self, layout):
        """The fields with every :class:`Ref` replaced by its absolute address."""
        return {name: (layout.address(v) if isinstance(v, Ref) else v) for name, v in self.fields.items()}

    def encode(self, layout):
        return isa.encode(self.op, **self.resolve(layout))

    def flags(self):
        return tuple(int(self.fields.get(n, 0)) for n in ("pop_prev", "pop_next", "push_prev", "push_next"))

    def __repr__(self):
        fields = " ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"{self.op.name} {fields}" + (f"  # {self.note}" if self.note else "")


@dataclass
class Layout:
    """Where every buffer lies: absolute addresses from ``base``; ``end`` is one past the last byte."""

    base: int
    addresses: dict        # Buffer -> address
    end: int

    def address(self, ref):
        if isinstance(ref, Buffer):
            ref = Ref(ref)
        if ref.buffer not in self.addresses:
            raise VerifyError(f"buffer {ref.buffer.name!r} has no address in this layout")
        return self.addresses[ref.buffer] + ref.offset

    def image(self, buffers):
        """The DRAM image ``[0, end)``: every ``const`` buffer's data in place, zeros elsewhere."""
        out = bytearray(self.end)
        for b in buffers:
            if b.data is not None and b in self.addresses:
                a = self.addresses[b]
                out[a:a + b.nbytes] = b.data
        return out


def _round_up(x, m):
    return -(-x // m) * m


class Program:
    """A sequence of :class:`Command` objects over named :class:`Buffer` objects."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.commands = []
        self.buffers = {}
        self._notes = []

    # ---- building ------------------------------------------------------------------------
    def buffer(self, name, nbytes=None, kind="scratch", data=None, **meta):
        """A new buffer (``nbytes`` defaults to ``len(data)``); names are unique."""
        if name in self.buffers:
            raise ValueError(f"a buffer named {name!r} exists already")
        size = len(data) if nbytes is None else int(nbytes)
        if size <= 0:
            raise ValueError(f"buffer {name!r} must have a positive size, not {size}")
        buf = Buffer(name, size, kind, data, meta=meta)
        self.buffers[name] = buf
        return buf

    def emit(self, op, note=None, **fields):
        """Append a command; returns it (its fields may still be changed until encoding)."""
        cmd = Command(isa.Opcode(op), dict(fields), note if note is not None else self.note)
        self.commands.append(cmd)
        return cmd

    def extend(self, commands):
        """Append commands built elsewhere; those without a note get the current one."""
        for cmd in commands:
            if not cmd.note:
                cmd.note = self.note
            self.commands.append(cmd)

    @property
    def note(self):
        return self._notes[-1] if self._notes else ""

    def noting(self, text):
        """``with prog.noting("layer.0.q_proj"):`` — commands emitted inside carry that note."""
        prog = self

        class _Ctx:
            def __enter__(self):
                prog._notes.append(text)

            def __exit__(self, *exc):
                prog._notes.pop()
        return _Ctx()

    # ---- passes -------------------------------------------------------------------------
    def _where(self, i):
        cmd = self.commands[i]
        return f"command {i} ({cmd.op.name}{', ' + cmd.note if cmd.note else ''})"

    def verify_tokens(self):
        """Token balance in program order (see the module docstring); raises :class:`VerifyError`."""
        self._check(_ZeroLayout(), None, None)

    def verify(self, layout, win_base=None, win_limit=None):
        """Token balance, and with the layout: every command passes :func:`isa.validate` in the
        window (default: the layout's extent) and every LOAD/STORE stays inside its buffer.
        Returns the encoded program; raises :class:`VerifyError`."""
        lo = layout.base if win_base is None else win_base
        hi = layout.end if win_limit is None else win_limit
        return self._check(layout, lo, hi)

    def encode(self, layout):
        """The program's bytes (unchecked: :meth:`verify` returns them checked)."""
        return b"".join(cmd.encode(layout) for cmd in self.commands)

    def _check(self, layout, win_base, win_limit):
        if not self.commands or self.commands[-1].op != Opcode.END:
            raise VerifyError("a program must end with END")
        balance = [0] * len(Token)
        out = []
        seen = {}       # commands without references repeat a lot (MATMULs): check each once
        for i, cmd in enumerate(self.commands):
            refs = cmd.refs()
            key = None if refs else (cmd.op, tuple(cmd.fields.items()))
            known = seen.get(key) if key is not None else None
            if known is None:
                fields = cmd.resolve(layout) if refs else cmd.fields
                word = isa.encode(cmd.op, **fields)
                decoded = _decoded(cmd.op, fields)
                err = ErrorCode.NONE if win_base is None else isa.validate(decoded, self.cfg, win_base, win_limit)
                known = (word, decoded, err)
                if key is not None:
                    seen[key] = known
            word, decoded, err = known
            out.append(word)
            if cmd.op == Opcode.END and i != len(self.commands) - 1:
                raise VerifyError(f"{self._where(i)}: END before the end of the program")
            if err != ErrorCode.NONE:
                raise VerifyError(f"{self._where(i)} would stop the NPU with {err.name} "
                                  f"({isa.ERROR_TEXT[err]}): {cmd!r}")
            if win_base is not None:
                for name, ref in refs:
                    extent = _extent(decoded)
                    if extent is not None and (ref.offset < 0 or ref.offset + extent > ref.buffer.nbytes):
                        raise VerifyError(f"{self._where(i)}: {name} reaches bytes [{ref.offset}, "
                                          f"{ref.offset + extent}) of buffer {ref.buffer.name!r}, which has "
                                          f"{ref.buffer.nbytes}")
            if not (decoded.pop_prev or decoded.pop_next or decoded.push_prev or decoded.push_next):
                continue
            for token, delta in isa.token_deltas(decoded).items():
                balance[token] += delta
                if balance[token] < 0:
                    raise VerifyError(f"{self._where(i)} pops {token.name} with no token pushed before it "
                                      f"in program order (the dispatcher could deadlock)")
                if balance[token] > self.cfg.token_limit:
                    raise VerifyError(f"{self._where(i)} takes {token.name} past the configuration's "
                                      f"token_limit ({self.cfg.token_limit})")
        left = {t.name: n for t, n in zip(Token, balance) if n}
        if left:
            raise VerifyError(f"tokens left over at END: {left}")
        return b"".join(out)

    def __len__(self):
        return len(self.commands)


_FLAGS = ("pop_prev", "pop_next", "push_prev", "push_next")
_ZERO_FIELDS = {op: {f.name: 0 for f in isa.FIELDS[op]} for op in Opcode}


def _decoded(op, fields):
    """The :class:`isa.Command` that encoding ``fields`` and decoding the bytes would give
    (encode has checked every value's range)."""
    own = dict(_ZERO_FIELDS[op])
    own.update((k, int(v)) for k, v in fields.items() if k not in _FLAGS)
    own["_reserved"] = 0
    return isa.Command(int(op), own, *(int(fields.get(f, 0)) for f in _FLAGS))


class _ZeroLayout:
    """Resolves every reference to its offset: enough to decode flags and fields."""

    def address(self, ref):
        return ref.offset


def _extent(cmd):
    """Bytes a LOAD or STORE spans from its ``dram_addr`` (None when it moves nothing)."""
    f = cmd.fields
    if cmd.opcode == Opcode.LOAD:
        row = f["row_bytes"]
    elif cmd.opcode == Opcode.STORE:
        row = f["cols"] * (4 if f["fmt"] == 0 else 1)
    else:
        return None
    if not f["rows"] or not row:
        return None
    return (f["rows"] - 1) * f["dram_stride"] + row


def allocate(buffers, base=0, lifetimes=None, order=None):
    """A :class:`Layout` for ``buffers`` from ``base`` (a multiple of :data:`ALIGN`).

    Buffers are placed in ``order`` (default: as given), each at the lowest aligned address
    that does not overlap a placed buffer whose lifetime overlaps its own (``lifetimes``:
    Buffer -> (first, last); buffers without one live for the whole program). With no
    lifetimes this is a plain sequential layout.
    """
    if base % ALIGN or base < 0:
        raise ValueError(f"base must be a non-negative multiple of {ALIGN}, not 0x{base:x}")
    lifetimes = lifetimes or {}
    placed = []              # (address, end, lifetime)
    addresses = {}
    forever = (float("-inf"), float("inf"))
    for b in (order or buffers):
        life = lifetimes.get(b, forever)
        candidates = [base] + [_round_up(end, max(b.align, ALIGN)) for _, end, _ in placed]
        for start in sorted(candidates):
            start = _round_up(start, max(b.align, ALIGN))
            clash = any(start < end and a < start + b.nbytes and life[0] <= lf[1] and lf[0] <= life[1]
                        for a, end, lf in placed)
            if not clash:
                break
        addresses[b] = start
        placed.append((start, start + b.nbytes, life))
    end = _round_up(max([base] + [e for _, e, _ in placed]), ALIGN)
    if end > isa.ADDRESS_SPACE:
        raise ValueError(f"the buffers need {end - base:,} bytes of DRAM, more than the 32-bit address space")
    return Layout(base, addresses, end)


def address_space_problem(layout, cfg):
    """None if ``layout``'s buffers lie inside the address space of ``cfg``'s NPU
    (``NPUConfig.address_space``), else one sentence saying how much DRAM they need."""
    if layout.end > cfg.address_space:
        return (f"the buffers need DRAM up to byte {layout.end:,}, past the {cfg.address_space:,} bytes the NPU "
                f"can address with axi_addr_bits {cfg.axi_addr_bits}")
    return None
