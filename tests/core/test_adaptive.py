"""AdaMV-MoE adaptive top-k controller (`mmoe.AdaptiveTopK`): hand-derived traces of the rule in
methods.md §4.2, the shared flag/stop, the max_k bound, the effect on routing, resume, and errors.

Rule (methods.md §4.2), used for every expected value below: per check, for task in (cls, det):
  if v < best: best = v; best_step = step; flag = False
  elif step - best_step > patience and k < max_k and not stop:
      if flag: k -= 1; stop = True   else: k += 1          (changed = True)
after the loop: if changed: flag = True.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import mmoe
from mmoe import AdaptiveTopK, MoEConfig
from mmoe.adaptive import TopKChange

TASKS = ("cls", "det")


class TwoMoE(nn.Module):
    """Two MoE layers with a dense layer between them, each with ``num_tasks`` routers."""

    def __init__(self, num_tasks: int = 2, num_experts: int = 8) -> None:
        super().__init__()
        cfg = MoEConfig(dim=8, num_experts=num_experts, top_k=2, expert_hidden=8, num_tasks=num_tasks)
        self.moe1 = mmoe.MoE(cfg)
        self.mid = nn.Linear(8, 8)
        self.moe2 = mmoe.MoE(cfg)

    def forward(self, x, task):
        return self.moe2(self.mid(self.moe1(x, task=task)), task=task)


def layer_ks(model) -> list[dict[str, int]]:
    """The k every MoE layer uses for each task."""
    return [{t: m.top_k(i) for i, t in enumerate(TASKS)} for _, m in mmoe.moe_layers(model)]


def K(cls: int, det: int) -> dict[str, int]:
    return {"cls": cls, "det": det}


def run_trace(ctrl, model, trace):
    """Feed ``(step, cls_loss, det_loss, expected_return, expected_new_history)`` rows and check the
    return value, every layer's k and the history after each one."""
    hist = list(ctrl.history)
    for step, c, d, expected, new_hist in trace:
        out = ctrl.update(step, {"cls": c, "det": d})
        assert out == expected, f"step {step}: returned {out}, expected {expected}"
        hist += new_hist
        assert ctrl.history == hist, f"step {step}"
        assert layer_ks(model) == [ctrl.ks, ctrl.ks], f"step {step}"
        if expected is not None:
            assert ctrl.ks == expected


# The hand-worked trace of test 1 (check_every=2000, patience=5000, defaults best=100, best_step=40000).
# Columns: step, v_cls, v_det, return of update, history entries added.
TRACE = [
    # 2000: both < 100 -> new bests (best_step=2000); flag=False
    (2000, 5.0, 6.0, None, []),
    # 4000: both improve -> best_step_cls=4000, best_step_det=4000
    (4000, 4.0, 5.0, None, []),
    # 6000: cls 4.5 >= 4.0, 6000-4000=2000 <= 5000 -> nothing; det 4.0 new best (6000)
    (6000, 4.5, 4.0, None, []),
    # 8000: cls 8000-4000=4000 <= 5000 -> nothing; det new best (8000)
    (8000, 4.5, 3.0, None, []),
    # 10000: cls 10000-4000=6000 > 5000, k=2<8, flag=False -> grow 2->3; det new best (flag=False);
    # changed -> flag=True after the loop
    (10000, 4.5, 2.0, K(3, 2), [TopKChange(10000, "cls", 2, 3, "grow")]),
    # 12000: cls 3.0 new best (12000) -> flag=False; det new best (12000)
    (12000, 3.0, 1.9, None, []),
    # 14000, 16000: cls 2000 / 4000 <= 5000 -> nothing; det new bests (14000, 16000)
    (14000, 3.5, 1.8, None, []),
    (16000, 3.5, 1.7, None, []),
    # 18000: cls 18000-12000=6000 > 5000, k=3<8, flag=False -> grow 3->4; det new best (18000); flag=True
    (18000, 3.5, 1.6, K(4, 2), [TopKChange(18000, "cls", 3, 4, "grow")]),
    # 20000: no new best for either task, flag=True: cls 8000 > 5000, k=4<8 -> revert 4->3, stop=True;
    # det 1.6 is not < 1.6 and 20000-18000=2000 <= 5000 -> nothing
    (20000, 3.5, 1.6, K(3, 2), [TopKChange(20000, "cls", 4, 3, "revert")]),
    # 22000..34000: both plateau; from 24000 det is past its patience (24000-18000=6000) but stop=True
    *[(s, 3.5, 1.6, None, []) for s in range(22000, 36000, 2000)],
    # 36000: new bests for both (flag=False) but stop stays: nothing changes
    (36000, 1.0, 1.0, None, []),
    # 38000..50000: plateau well past patience for both: still nothing (stop is shared and final)
    *[(s, 1.0, 1.0, None, []) for s in range(38000, 52000, 2000)],
]


def make(model=None, **kw):
    model = model if model is not None else TwoMoE()
    kw.setdefault("check_every", 2000)
    kw.setdefault("patience", 5000)
    return model, AdaptiveTopK(model, TASKS, **kw)


# ---------------------------------------------------------------------- 1. the hand-worked trace
def test_hand_worked_trace():
    model, ctrl = make()
    assert layer_ks(model) == [K(2, 2), K(2, 2)] and ctrl.ks == K(2, 2)
    run_trace(ctrl, model, TRACE[:9])  # up to the second grow at 18000
    assert ctrl.flag and not ctrl.stopped
    assert ctrl.best_losses == {"cls": 3.0, "det": 1.6} and ctrl.best_steps == {"cls": 12000, "det": 18000}
    run_trace(ctrl, model, TRACE[9:10])  # the revert
    assert ctrl.stopped and ctrl.ks == K(3, 2)
    run_trace(ctrl, model, TRACE[10:])
    assert ctrl.stopped and ctrl.ks == K(3, 2) and layer_ks(model) == [K(3, 2), K(3, 2)]
    # bests are still tracked after the freeze (36000), only k is frozen
    assert ctrl.best_losses == {"cls": 1.0, "det": 1.0} and ctrl.best_steps == {"cls": 36000, "det": 36000}
    assert [c.reason for c in ctrl.history] == ["grow", "grow", "revert"]


def test_initial_best_constants():
    # code defaults: best=100, best_step=40000. A loss >= 100 is no new best, and no change can happen
    # until step - 40000 > 5000, i.e. the first check after 45000.
    model, ctrl = make()
    for s in range(2000, 46000, 2000):
        assert ctrl.update(s, {"cls": 150.0, "det": 150.0}) is None
    assert ctrl.best_losses == {"cls": 100.0, "det": 100.0} and ctrl.best_steps == {"cls": 40000, "det": 40000}
    # 46000 - 40000 = 6000 > 5000, flag=False: both grow in this check (flag is set after the loop)
    assert ctrl.update(46000, {"cls": 150.0, "det": 150.0}) == K(3, 3)
    # with initial_best_loss=inf the first finite loss is the first best
    _, ctrl = make(initial_best_loss=math.inf)
    assert ctrl.update(2000, {"cls": 150.0, "det": 150.0}) is None
    assert ctrl.best_losses == {"cls": 150.0, "det": 150.0} and ctrl.best_steps == {"cls": 2000, "det": 2000}


# ---------------------------------------------------------------------- 2. shared flag and stop
def test_flag_is_shared_across_tasks():
    # patience=2, one check per step
    model, ctrl = make(check_every=1, patience=2)
    run_trace(ctrl, model, [
        (1, 1.0, 1.0, None, []),  # both new bests (best_step 1)
        (2, 1.0, 1.0, None, []),  # 2-1=1 <= 2
        (3, 1.0, 1.0, None, []),  # 3-1=2, not > 2
        # 4-1=3 > 2 for both; flag=False during the whole loop (set only after it) -> BOTH grow
        (4, 1.0, 1.0, K(3, 3), [TopKChange(4, "cls", 2, 3, "grow"), TopKChange(4, "det", 2, 3, "grow")]),
        # cls new best clears the SHARED flag; det (5-1=4 > 2) then grows instead of reverting
        (5, 0.9, 1.0, K(3, 4), [TopKChange(5, "det", 3, 4, "grow")]),
        # cls 6-5=1 <= 2 -> nothing; det 5 > 2 with flag=True -> revert 4->3, stop
        (6, 0.9, 1.0, K(3, 3), [TopKChange(6, "det", 4, 3, "revert")]),
        # cls 7-5=2, 8-5=3 > 2 but stop is shared: cls never changes again
        (7, 0.9, 1.0, None, []),
        (8, 0.9, 1.0, None, []),
    ])
    assert ctrl.stopped


def test_revert_hits_the_next_triggering_task_and_freezes_all():
    # max_k=3: once cls is at 3 it cannot trigger, so det (which never grew) is the next task to
    # trigger while flag=True, and the code's revert decrements det: 2 -> 1.
    def trace(min_k_det_after):
        return [
            (1, 1.0, 1.0, None, []),  # bests at 1
            (2, 1.0, 0.9, None, []),  # det best (2)
            (3, 1.0, 0.8, None, []),  # cls 3-1=2 not > 2; det best (3)
            # cls 4-1=3 > 2, k=2<3, flag=False -> grow; det 4-3=1 -> nothing; flag=True
            (4, 1.0, 0.8, K(3, 2), [TopKChange(4, "cls", 2, 3, "grow")]),
            # cls k=3 is not < max_k -> nothing (and never reverted); det 5-3=2 not > 2
            (5, 1.0, 0.8, None, []),
            # det 6-3=3 > 2, k=2<3, flag=True -> revert det, stop for both
            (6, 1.0, 0.8, K(3, min_k_det_after), [TopKChange(6, "det", 2, min_k_det_after, "revert")]),
            (7, 1.0, 0.8, None, []),
            (8, 0.5, 0.5, None, []),  # new bests: flag=False but stop stays
            *[(s, 0.5, 0.5, None, []) for s in range(9, 14)],
        ]

    model, ctrl = make(check_every=1, patience=2, max_k=3)
    run_trace(ctrl, model, trace(1))
    assert ctrl.stopped
    # min_k=2 bounds that revert: det stays at 2, but the freeze still happens
    model, ctrl = make(check_every=1, patience=2, max_k=3, min_k=2)
    run_trace(ctrl, model, trace(2))
    assert ctrl.stopped


# ---------------------------------------------------------------------- 3. max_k
def test_k_never_exceeds_max_k():
    # patience=1, max_k=4; cls improves every 3rd step (1, 4, 7, ...), det improves at every step
    # (never triggers). cls: step 3: 3-1=2 > 1, flag=False -> 3; step 4 new best; step 6: grow -> 4;
    # step 9, 12, ...: k=4 is not < 4 -> nothing; stop never set.
    model, ctrl = make(check_every=1, patience=1, max_k=4)
    changes = {}
    for step in range(1, 31):
        out = ctrl.update(step, {"cls": 10.0 - (step - 1) // 3, "det": 100.0 - step})
        if out is not None:
            changes[step] = out
        assert max(ctrl.ks.values()) <= 4
        assert all(k <= 4 for d in layer_ks(model) for k in d.values())
    assert changes == {3: K(3, 2), 6: K(4, 2)}
    assert ctrl.ks == K(4, 2) and not ctrl.stopped
    # a constant plateau at max_k with flag=True: still neither grow nor revert (k < max_k guards both)
    model, ctrl = make(check_every=1, patience=0, max_k=3, initial_k=3)
    for step in range(1, 10):
        assert ctrl.update(step, {"cls": 1.0, "det": 1.0}) is None
    assert ctrl.ks == K(3, 3) and layer_ks(model) == [K(3, 3), K(3, 3)]


# ---------------------------------------------------------------------- 4. the forward uses the new k
def test_routing_uses_new_k():
    model, ctrl = make(check_every=1, patience=0)
    model.eval()
    x = torch.randn(5, 8)
    layers = [m for _, m in mmoe.moe_layers(model)]
    before1 = [m.route(x, task=1) for m in layers]
    before0 = [m.route(x, task=0) for m in layers]
    assert all(r.indices.shape[-1] == 2 for r in before0)
    assert ctrl.update(1, {"cls": 1.0, "det": 1.0}) is None
    # cls: 2-1=1 > 0, flag=False -> grow to 3; det new best
    assert ctrl.update(2, {"cls": 1.0, "det": 0.5}) == K(3, 2)
    for m, b0, b1 in zip(layers, before0, before1):
        r0 = m.route(x, task=0)
        assert r0.indices.shape[-1] == 3
        assert torch.equal(r0.indices[:, :2], b0.indices)  # top-3 extends the same top-2
        r1 = m.route(x, task=1)
        assert torch.equal(r1.indices, b1.indices) and torch.equal(r1.weights, b1.weights)
    # the full forward routes with the new k too
    for m in layers:
        m.record_routing = True
    model(x, task=0)
    assert all(m.last_routing.indices.shape[-1] == 3 for m in layers)
    model(x, task=1)
    assert all(m.last_routing.indices.shape[-1] == 2 for m in layers)


# ---------------------------------------------------------------------- 5. resume
def test_state_dict_round_trip_mid_trace():
    model_a, a = make()
    run_trace(a, model_a, TRACE[:9])  # stop right after the 2nd grow: flag=True, k_cls=4
    state = json.loads(json.dumps(a.state_dict()))  # plain data
    model_b, b = make()  # a freshly built model: the constructor sets the initial k
    assert layer_ks(model_b) == [K(2, 2), K(2, 2)]
    b.load_state_dict(state)
    assert layer_ks(model_b) == [K(4, 2), K(4, 2)]
    assert b.state_dict() == a.state_dict() and b.history == a.history
    # both continue identically (the revert at 20000 needs the restored flag and best steps)
    for step, c, d, *_ in TRACE[9:]:
        out_a = a.update(step, {"cls": c, "det": d})
        out_b = b.update(step, {"cls": c, "det": d})
        assert out_a == out_b, step
        assert layer_ks(model_b) == layer_ks(model_a)
    assert b.state_dict() == a.state_dict() and b.ks == K(3, 2) and b.stopped
    # the restored last step is enforced
    with pytest.raises(ValueError, match="step"):
        b.update(TRACE[-1][0], {"cls": 1.0, "det": 1.0})
    # apply() sets the k's on another (e.g. rebuilt-for-eval) model
    model_c = TwoMoE()
    b.apply(model_c)
    assert layer_ks(model_c) == [K(3, 2), K(3, 2)]


# ---------------------------------------------------------------------- 6. errors
def test_validation_errors():
    with pytest.raises(ValueError, match="no mmoe.MoE layers"):
        AdaptiveTopK(nn.Sequential(nn.Linear(8, 8)), TASKS)
    with pytest.raises(ValueError, match="num_tasks=1"):
        AdaptiveTopK(TwoMoE(num_tasks=1), TASKS)
    with pytest.raises(ValueError, match="max_k=9.*num_experts=8"):
        AdaptiveTopK(TwoMoE(), TASKS, max_k=9)
    with pytest.raises(ValueError, match="initial_k"):
        AdaptiveTopK(TwoMoE(), TASKS, initial_k=5, max_k=4)
    with pytest.raises(ValueError, match="duplicate"):
        AdaptiveTopK(TwoMoE(), ("cls", "cls"))

    model, ctrl = make()
    ctrl.update(2000, {"cls": 5.0, "det": 5.0})
    state = ctrl.state_dict()
    # a new best for cls and a NaN for det: error naming det and the step, and no state change
    with pytest.raises(ValueError, match=r"'det' at step 4000 is not finite"):
        ctrl.update(4000, {"cls": 1.0, "det": float("nan")})
    with pytest.raises(ValueError, match=r"'cls' at step 4000 is not finite"):
        ctrl.update(4000, {"cls": torch.tensor(float("inf")), "det": 1.0})
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['seg'\]"):
        ctrl.update(4000, {"cls": 1.0, "det": 1.0, "seg": 1.0})
    with pytest.raises(ValueError, match=r"missing task\(s\) \['det'\]"):
        ctrl.update(4000, {"cls": 1.0})
    with pytest.raises(ValueError, match="not after the previous check"):
        ctrl.update(2000, {"cls": 1.0, "det": 1.0})
    assert ctrl.state_dict() == state

    other = AdaptiveTopK(TwoMoE(), ("det", "cls"))
    with pytest.raises(ValueError, match="tasks"):
        other.load_state_dict(state)


def test_should_check():
    _, ctrl = make()
    assert [s for s in range(0, 10001, 1000) if ctrl.should_check(s)] == [2000, 4000, 6000, 8000, 10000]
