"""Gate logic: the routing state every expert layer reads, and the checks of gates.

Why a shared object instead of forward arguments or hooks: a backbone's ``forward`` does
not know about gates (extra keyword arguments reach it and crash it), and forward hooks
are not re-run when activation checkpointing recomputes a segment during backward.
Reading a plain attribute is traced by ``torch.compile`` without a graph break.

When gates may be read (issue 7, "stale gates"): a routed call
(:meth:`RoutingState.activate`, used by ``LoraIRModel.forward`` and by peft's
``PeftModel.forward`` path) makes its gates and embedding *live* for the duration of the
call. After the call they stay stored, because activation checkpointing recomputes
segments during ``backward`` and must read the same gates, but expert layers refuse them
outside a call (in the call's own thread), outside a ``loraxir.route(...)`` block and
outside autograd's backward: a later direct ``model.model(x)``, compiled or not, or one
made in another thread while a call runs, raises :class:`RoutingError` instead of silently
reusing that routing. They are replaced at the start of the next call. (Consequence: with
activation checkpointing, run ``backward`` before the next routed call, as a training step
does.)

The functions below turn degradation names into gates, check explicit and fixed (merge)
gates, and check that a router's classes are the adapter's; ``LoraIRModel`` calls them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

from loraxir.errors import ConfigError, RoutingError, unknown_name

Degradation = str | Sequence[str]


class RoutingState:
    """Gates and degradation embedding of the current call, and the fixed gate of a merge.

    Attributes:
        gates: ``(B, E)`` mixture weights of the current batch, one row per image (one row
            for every image of any batch inside ``loraxir.route(model, degradation=name)``),
            or ``None``.
        embedding: ``(B, D)`` the router's degradation embedding ``e_deg`` of the current
            call, read by DAM blocks (:mod:`loraxir.guidance`), or ``None``.
        merge_gate: ``(E,)`` gate folded into the base weights by ``merge``, or ``None``.
        pinned: ``True`` inside ``loraxir.route(...)``: calls without gates keep these.
        merged_layers: how many expert layers sharing this state are merged now (kept by
            the layers' ``merge``/``unmerge``), so that a call learns it without walking
            the backbone's modules.
        cache_folds: whether expert layers keep the weights they fold for one-expert gate
            rows between inference calls (see :meth:`LoraIRModel.cache_folds
            <loraxir.LoraIRModel.cache_folds>`).
        adapters_enabled: ``False`` while peft's ``disable_adapter()`` (or
            ``disable_adapter_layers()``) runs the bare backbone: DAM blocks then pass their
            input through, as the expert layers do.
        lock: held for each call of the model (and to pin or unpin gates), so that
            threads sharing one model take turns instead of reading each other's gates
            (the gates live here, not in the call's arguments).
        pin_lock: held for each ``loraxir.route`` block: a block in another thread, and a
            call of another thread that brings its own routing, wait for it to end, while
            calls that use the pinned gates run from any thread (a thread pool).
    """

    def __init__(self) -> None:
        self.gates: torch.Tensor | None = None
        self.embedding: torch.Tensor | None = None
        self.merge_gate: torch.Tensor | None = None
        self.pinned = False
        self.merged_layers = 0
        self.cache_folds = True
        self.adapters_enabled = True
        self._calls = 0  # routed calls running now (nested calls count once each)
        self._caller: int | None = None  # the thread of the running call
        # (gates, version, values): what derived() computed from those gates.
        self._derived: tuple[torch.Tensor, int | None, dict[Hashable, Any]] | None = None
        self.lock = threading.RLock()
        self.pin_lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        # Copies (deepcopy, pickle) start without the last call's routing, as they start
        # without kept folds: after a training call its gates are part of an autograd graph
        # (a router that trains), which deepcopy refuses, and no copy is inside that call.
        # Nor inside a loraxir.route block (maybe another thread's Restorer's): no block would
        # ever end on the copy, which would run every later call with those gates. A lock
        # is not copied.
        state = dict(self.__dict__)
        del state["lock"], state["pin_lock"]
        state["gates"] = state["embedding"] = None
        state["pinned"], state["_derived"], state["_calls"], state["_caller"] = False, None, 0, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"_caller": None, **state})  # a model pickled before it existed
        self.lock = threading.RLock()
        self.pin_lock = threading.RLock()

    @contextlib.contextmanager
    def turn(self, own_routing: bool) -> Iterator[None]:
        """This thread's turn for one call: the routing lock, and, for a call that brings
        its own routing (gates or names given; the router's when nothing is pinned), the pin
        lock too. Such a call waits for another thread's ``loraxir.route`` block to end,
        because direct backbone calls in that block read whatever gates are live and would
        take this call's. A call that gives no routing while a block is open uses its pinned
        gates (a worker thread of the block) and runs inside the block."""
        held = self.pin_lock.acquire(blocking=False)
        if not held and (own_routing or not self.pinned):
            self.pin_lock.acquire()
            held = True
        try:
            with self.lock:
                yield
        finally:
            if held:
                self.pin_lock.release()

    @contextlib.contextmanager
    def activate(
        self, gates: torch.Tensor | None, embedding: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Make ``gates`` and ``embedding`` the live routing of one call (see module doc).

        Inside ``loraxir.route`` the pinned gates and embedding come back when the call
        ends: a call may run with other gates (none on a merged model) and the next call in
        the block must still find the pinned ones."""
        pinned = (self.gates, self.embedding) if self.pinned else None
        caller = self._caller
        self.gates, self.embedding = gates, embedding
        self._derived = None
        self._calls += 1
        # (A compiled graph reads _calls only: threads are no part of what it traces.)
        self._caller = None if torch.compiler.is_compiling() else threading.get_ident()
        try:
            yield
        finally:
            self._calls -= 1
            self._caller = caller
            if pinned is not None:
                self.gates, self.embedding = pinned

    def _readable(self) -> bool:
        if self.pinned:
            return True
        if torch.compiler.is_compiling():  # a compiled direct call reads no finished call's gates
            return bool(self._calls)
        # The call's own thread: a direct backbone call of another thread, made while this
        # call runs, would otherwise read its gates.
        if self._calls and self._caller == threading.get_ident():
            return True
        # Activation checkpointing recomputes forward segments inside autograd's backward.
        return torch._C._current_graph_task_id() != -1

    def require_gates(self) -> torch.Tensor:
        """Return the gates of the current call, or raise if there is no routed call."""
        return self._require(
            self.gates,
            "An expert layer ran without gates. Call the LoraIRModel (model(x, gates=...), "
            "model(x, degradation=...), or attach a router), or wrap a direct backbone call in "
            "`with loraxir.route(model, gates=...)`; gates of a finished call are not reused.",
        )

    def derived(self, key: Hashable, build: Callable[[torch.Tensor], Any]) -> Any:
        """``build(gates)`` for the live gates, computed once and shared by every layer.

        Which experts a batch uses, which images share a gate row and the coefficient rows
        as Python numbers are the same in every layer of a call: computing them once per
        call instead of once per layer removes most of the small per-layer work. Values must
        not be autograd-tracked (a recomputing checkpoint must save the same tensors). They
        are valid for this gate tensor while it is unchanged: the cache is dropped when a
        call starts and when the tensor's version moves (an in-place edit); an inference
        tensor, which has no version, is only cached inside a call.
        """
        gates = self.require_gates()
        version = None if gates.is_inference() else gates._version
        cache = self._derived
        if cache is None or cache[0] is not gates or cache[1] != version:
            if version is None and not self._calls:
                return build(gates)
            cache = self._derived = (gates, version, {})
        values = cache[2]
        if key not in values:
            values[key] = build(gates)
        return values[key]

    def require_embedding(self) -> torch.Tensor:
        """Return the current degradation embedding, or raise if no router has set it."""
        return self._require(
            self.embedding,
            "A DAM block ran without a degradation embedding. DAM blocks read e_deg from the "
            "router: attach one (get_loraxir_model(backbone, config, router=...)) and call the "
            "LoraIRModel, or run the backbone through "
            "loraxir.guidance.GuidedBackbone(backbone, router).",
        )

    def _require(self, value: torch.Tensor | None, message: str) -> torch.Tensor:
        if value is None or not self._readable():
            raise RoutingError(message)
        return value


def check_gates(gates: torch.Tensor, num_experts: int, batch_size: int) -> torch.Tensor:
    """Validate a ``(B, E)`` gate tensor and return it expanded to ``batch_size`` rows.

    Gates must be finite and non-negative; rows need not sum to one (a user may scale an
    expert up or mix several at will), but a row of zeros is allowed and means "base only".
    """
    if not isinstance(gates, torch.Tensor):
        raise RoutingError(
            f"gates must be a torch.Tensor of shape (B, E), got {type(gates).__name__}."
        )
    given = tuple(gates.shape)
    if gates.dim() == 1:
        gates = gates.unsqueeze(0)
    if gates.dim() != 2 or gates.shape[1] != num_experts or gates.shape[0] not in (1, batch_size):
        raise RoutingError(
            f"gates must have shape (B={batch_size}, E={num_experts}) (or (E,) for all images), "
            f"got {given}."
        )
    if not gates.is_floating_point():
        raise RoutingError(f"gates must be a floating-point tensor, got dtype {gates.dtype}.")
    if not torch.compiler.is_compiling():
        if not bool(torch.isfinite(gates).all()):
            raise RoutingError("gates contain NaN or infinite values; pass finite mixture weights.")
        if bool((gates < 0).any()):
            raise RoutingError(
                f"gates must be non-negative (mixture weights), got a minimum of "
                f"{float(gates.min()):.4g}. Apply a softmax to router logits first."
            )
    return gates.expand(batch_size, -1)


def degradation_gates(
    degradation: Degradation, known: Sequence[str], batch_size: int | None = None
) -> torch.Tensor:
    """One-hot gates for a degradation name or one name per image.

    ``batch_size=None`` gives one row for a single name (it serves a batch of any size)
    and one row per name for a list.
    """
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0
    ):
        raise RoutingError(f"batch_size must be a whole number >= 0 or None, got {batch_size!r}.")
    if isinstance(degradation, str):
        names = [degradation] * (1 if batch_size is None else batch_size)
    elif isinstance(degradation, Sequence) and all(isinstance(n, str) for n in degradation):
        names = list(degradation)
        if batch_size is not None and len(names) != batch_size:
            raise RoutingError(
                f"Got {len(names)} degradation names for a batch of {batch_size} images; pass "
                "one name for all images or one per image."
            )
    else:
        raise RoutingError(
            f"degradation={degradation!r} is neither a class name nor a list of names (one "
            f"per image); the classes are {list(known)}."
        )
    for name in [degradation] if isinstance(degradation, str) else names:
        if name not in known:
            raise unknown_name("degradation", name, known)
    gates = torch.zeros(len(names), len(known))
    for row, name in enumerate(names):
        gates[row, list(known).index(name)] = 1.0
    return gates


def fixed_gate(
    gates: torch.Tensor | None, degradation: str | None, known: Sequence[str]
) -> torch.Tensor:
    """The ``(E,)`` gate of a merge: from a degradation name (one-hot) or ``gates``."""
    if (gates is None) == (degradation is None):
        raise RoutingError("Merging needs exactly one of gates=(E,) or degradation='name'.")
    if degradation is not None:
        if not isinstance(degradation, str):
            raise RoutingError("Merging takes one degradation name (one gate for all images).")
        return degradation_gates(degradation, known)[0]
    gate = torch.as_tensor(gates)
    if not gate.is_floating_point():
        gate = gate.float()
    # A float64 gate stays float64 here: LoraIRModel.merge folds it at the weights' precision.
    return check_gates(gate, len(known), 1)[0]


def check_merged_request(
    requested: torch.Tensor, merge_gate: torch.Tensor, known: Sequence[str]
) -> None:
    """Accept routing ``(B, E)`` that asks for the merged gate on every image; refuse others.

    A merged model has one gate folded into its weights: asking for that gate (by name or
    by value) is the call a user writes and is served; anything else cannot be.
    """
    if bool((requested.to(merge_gate) == merge_gate).all()):
        return
    raise RoutingError(
        f"The experts are merged for the fixed gate {_describe(merge_gate, known)}; this call "
        f"asks for {_describe_rows(requested, known)}. Call model.unmerge() to route per image "
        "(or merge for that gate)."
    )


def _describe(gate: torch.Tensor, known: Sequence[str]) -> str:
    hot = gate.nonzero().flatten().tolist()
    if len(hot) == 1 and float(gate[hot[0]]) == 1.0:
        return f"{known[hot[0]]!r}"
    return "[" + ", ".join(f"{float(v):.10g}" for v in gate) + "]"


def _describe_rows(rows: torch.Tensor, known: Sequence[str]) -> str:
    unique = torch.unique(rows.detach().cpu().double(), dim=0)
    return ", ".join(_describe(row, known) for row in unique)


def check_degradations(router_classes: Sequence[str], adapter_classes: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless a router's classes are the adapter's, in order.

    Gate ``i`` drives expert ``i``: a router trained on other classes, or the same classes
    in another order, would silently send images to the wrong experts.
    """
    if list(router_classes) == list(adapter_classes):
        return
    missing = [name for name in adapter_classes if name not in router_classes]
    extra = [name for name in router_classes if name not in adapter_classes]
    detail = (
        f"missing from the router: {missing}; not in the adapter: {extra}"
        if missing or extra
        else "same classes in another order"
    )
    raise ConfigError(
        f"Router classes {list(router_classes)} differ from the adapter's degradations "
        f"{list(adapter_classes)} ({detail}). Gate i drives expert i: train or load a router "
        "with exactly the adapter's classes in the same order."
    )


def check_router(router: Any, config: Any) -> None:
    """Raise :class:`ConfigError` unless ``router`` can route the adapter of ``config`` (a
    :class:`~loraxir.LoraIRConfig`): the same classes in the same order, the same
    ``top_k``, and with DAM blocks an embedding of their ``embed_dim``. Called before
    anything is changed."""
    check_degradations(list(getattr(router, "degradations", [])), config.degradations)
    router_top_k = getattr(router, "top_k", config.top_k)
    if router_top_k != config.top_k:
        raise ConfigError(
            f"router.top_k={router_top_k} but config.top_k={config.top_k}; build the router "
            "with the config's top_k."
        )
    dam = getattr(config, "dam", None)
    width = getattr(router, "embed_dim", None)
    if dam is not None and width is not None and width != dam.embed_dim:
        raise ConfigError(
            f"The router's degradation embedding has {width} values but the DAM blocks read "
            f"{dam.embed_dim} (DAMConfig.embed_dim); give DAMConfig the router's embed_dim."
        )
