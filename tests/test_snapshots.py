"""The rewritten graph is the spec: these snapshots show it (regenerate with EXPECTTEST_ACCEPT=1).

Each graph is what ``offload_eager`` runs: the AOTAutograd inference graph after the offload
pass, with ``prefetch=2, prefetch_head=1`` (at most three regions on the device: the head and two
fetched; the defaults choose these per graph by bytes, which on models this small would make
every region a head) and ``refill_in_graph=0`` unless a test is about it (the bytes of the refill
copied in the call are a policy of their own: the snapshots show structure).

Three snapshots show whole graphs, for reference; the rest show the compact view
(``format_offload_nodes``): the fx_offload nodes in graph order with their arguments, then the
reads each region's fetched tensors serve. Read them for: which parameters each fetch carries,
that every read of an offloaded parameter goes through a fetched tensor (no "reads left on the
host"), that release follows the last reader, and where each fetch is issued (its ``after``
token, and the ``issued`` list of the wait that first needs it started).
"""

from unittest import mock

import torch
from expecttest import TestCase

import fx_offload
from fx_offload import estimate
from tests.models import Broken, CalledTwice, Nested, Stack, Tied, seeded


class Snapshots(TestCase):
    def setUp(self):
        torch._dynamo.reset()
        self.models = []

    def tearDown(self):
        for model in self.models:
            fx_offload.restore(model)
        torch._dynamo.reset()

    def explain(self, model, patterns, *inputs, compact=True, **options):
        options.setdefault("prefetch", 2)
        options.setdefault("prefetch_head", 1)
        options.setdefault("refill_in_graph", 0)
        options.setdefault("heads_as_inputs", False)
        fx_offload.offload(model, patterns, device="cpu")
        self.models.append(model)
        with torch.no_grad():
            return fx_offload.explain(model, *inputs, options=options, compact=compact)

    def test_nested_visual_tower(self):
        text = self.explain(seeded(Nested), ["visual"], torch.randn(2, 8), compact=False)
        self.assertExpectedInline(
            text,
            """\
# graph 1 of 1
# regions: thinker.visual
# arg0_1: thinker.visual.proj.weight
# arg1_1: thinker.visual.proj.bias
# arg3_1: thinker.visual.block.fc1.weight
# arg4_1: thinker.visual.block.fc1.bias
# arg5_1: thinker.visual.block.fc2.weight
# arg6_1: thinker.visual.block.fc2.bias
    def forward(self, arg0_1: "f32[8, 8]", arg1_1: "f32[8]", arg2_1: "f32[2, 8]", arg3_1: "f32[16, 8]", arg4_1: "f32[16]", arg5_1: "f32[8, 16]", arg6_1: "f32[8]", arg7_1: "f32[8]", arg8_1: "f32[8]", arg9_1: "f32[4, 8]", arg10_1: "f32[4]"):
        head = torch.ops.fx_offload.head.default([arg0_1, arg1_1, arg3_1, arg4_1, arg5_1, arg6_1], 'thinker.visual')
        fetched: "f32[8, 8]" = head[0]
        fetched_1: "f32[8]" = head[1]
        fetched_2: "f32[16, 8]" = head[2]
        fetched_3: "f32[16]" = head[3]
        fetched_4: "f32[8, 16]" = head[4]
        fetched_5: "f32[8]" = head[5];  head = None
        wait = torch.ops.fx_offload.wait.default([fetched, fetched_1, fetched_2, fetched_3, fetched_4, fetched_5], [], 'thinker.visual');  wait = None
        t: "f32[8, 8]" = torch.ops.aten.t.default(fetched)
        addmm: "f32[2, 8]" = torch.ops.aten.addmm.default(fetched_1, arg2_1, t);  arg2_1 = t = None
        tanh: "f32[2, 8]" = torch.ops.aten.tanh.default(addmm);  addmm = None
        t_1: "f32[8, 16]" = torch.ops.aten.t.default(fetched_2)
        addmm_1: "f32[2, 16]" = torch.ops.aten.addmm.default(fetched_3, tanh, t_1);  t_1 = None
        relu: "f32[2, 16]" = torch.ops.aten.relu.default(addmm_1);  addmm_1 = None
        t_2: "f32[16, 8]" = torch.ops.aten.t.default(fetched_4)
        addmm_2: "f32[2, 8]" = torch.ops.aten.addmm.default(fetched_5, relu, t_2);  relu = t_2 = None
        slot: "u8[0]" = torch.ops.aten.empty.memory_format([0], dtype = torch.uint8, device = device(type='cpu'))
        release: "f32[0]" = torch.ops.fx_offload.release.default([fetched, fetched_1, fetched_2, fetched_3, fetched_4, fetched_5], [addmm_2], [slot], 'thinker.visual');  slot = None
        slot_1: "u8[0]" = torch.ops.aten.empty.memory_format([0], dtype = torch.uint8, device = device(type='cpu'))
        refill = torch.ops.fx_offload.refill.default([fetched, fetched_1, fetched_2, fetched_3, fetched_4, fetched_5], [arg0_1, arg1_1, arg3_1, arg4_1, arg5_1, arg6_1], [release], slot_1, 'thinker.visual');  arg0_1 = arg1_1 = arg3_1 = arg4_1 = arg5_1 = arg6_1 = release = refill = None
        add: "f32[2, 8]" = torch.ops.aten.add.Tensor(tanh, addmm_2);  tanh = addmm_2 = None
        native_layer_norm = torch.ops.aten.native_layer_norm.default(add, [8], arg7_1, arg8_1, 1e-05);  add = arg7_1 = arg8_1 = None
        getitem: "f32[2, 8]" = native_layer_norm[0];  native_layer_norm = None
        t_3: "f32[8, 4]" = torch.ops.aten.t.default(arg9_1);  arg9_1 = None
        addmm_3: "f32[2, 4]" = torch.ops.aten.addmm.default(arg10_1, getitem, t_3);  arg10_1 = getitem = t_3 = None
        join = torch.ops.fx_offload.join.default([fetched, fetched_1, fetched_2, fetched_3, fetched_4, fetched_5], [addmm_3], slot_1, 'thinker.visual');  fetched = fetched_1 = fetched_2 = fetched_3 = fetched_4 = fetched_5 = slot_1 = join = None
        return (addmm_3,)""",
        )

    def test_layer_stack(self):
        text = self.explain(seeded(Stack), ["layers.*"], torch.randn(2, 8), compact=False)
        self.assertExpectedInline(
            text,
            """\
# graph 1 of 1
# regions: layers.0, layers.1, layers.2
# arg0_1: layers.0.fc1.weight
# arg1_1: layers.0.fc1.bias
# arg3_1: layers.0.fc2.weight
# arg4_1: layers.0.fc2.bias
# arg5_1: layers.1.fc1.weight
# arg6_1: layers.1.fc1.bias
# arg7_1: layers.1.fc2.weight
# arg8_1: layers.1.fc2.bias
# arg9_1: layers.2.fc1.weight
# arg10_1: layers.2.fc1.bias
# arg11_1: layers.2.fc2.weight
# arg12_1: layers.2.fc2.bias
    def forward(self, arg0_1: "f32[16, 8]", arg1_1: "f32[16]", arg2_1: "f32[2, 8]", arg3_1: "f32[8, 16]", arg4_1: "f32[8]", arg5_1: "f32[16, 8]", arg6_1: "f32[16]", arg7_1: "f32[8, 16]", arg8_1: "f32[8]", arg9_1: "f32[16, 8]", arg10_1: "f32[16]", arg11_1: "f32[8, 16]", arg12_1: "f32[8]", arg13_1: "f32[8, 8]"):
        head = torch.ops.fx_offload.head.default([arg0_1, arg1_1, arg3_1, arg4_1], 'layers.0')
        fetched: "f32[16, 8]" = head[0]
        fetched_1: "f32[16]" = head[1]
        fetched_2: "f32[8, 16]" = head[2]
        fetched_3: "f32[8]" = head[3];  head = None
        fetch_1 = torch.ops.fx_offload.fetch.default([arg5_1, arg6_1, arg7_1, arg8_1], [], 'layers.1');  arg5_1 = arg6_1 = arg7_1 = arg8_1 = None
        fetched_4: "f32[16, 8]" = fetch_1[0]
        fetched_5: "f32[16]" = fetch_1[1]
        fetched_6: "f32[8, 16]" = fetch_1[2]
        fetched_7: "f32[8]" = fetch_1[3];  fetch_1 = None
        fetch_2 = torch.ops.fx_offload.fetch.default([arg9_1, arg10_1, arg11_1, arg12_1], [], 'layers.2');  arg9_1 = arg10_1 = arg11_1 = arg12_1 = None
        fetched_8: "f32[16, 8]" = fetch_2[0]
        fetched_9: "f32[16]" = fetch_2[1]
        fetched_10: "f32[8, 16]" = fetch_2[2]
        fetched_11: "f32[8]" = fetch_2[3];  fetch_2 = None
        wait = torch.ops.fx_offload.wait.default([fetched, fetched_1, fetched_2, fetched_3], [fetched_4, fetched_8], 'layers.0');  wait = None
        t: "f32[8, 16]" = torch.ops.aten.t.default(fetched)
        addmm: "f32[2, 16]" = torch.ops.aten.addmm.default(fetched_1, arg2_1, t);  t = None
        relu: "f32[2, 16]" = torch.ops.aten.relu.default(addmm);  addmm = None
        t_1: "f32[16, 8]" = torch.ops.aten.t.default(fetched_2)
        addmm_1: "f32[2, 8]" = torch.ops.aten.addmm.default(fetched_3, relu, t_1);  relu = t_1 = None
        slot: "u8[0]" = torch.ops.aten.empty.memory_format([0], dtype = torch.uint8, device = device(type='cpu'))
        release: "f32[0]" = torch.ops.fx_offload.release.default([fetched, fetched_1, fetched_2, fetched_3], [addmm_1], [slot], 'layers.0');  slot = None
        add: "f32[2, 8]" = torch.ops.aten.add.Tensor(arg2_1, addmm_1);  arg2_1 = addmm_1 = None
        wait_1 = torch.ops.fx_offload.wait.default([fetched_4, fetched_5, fetched_6, fetched_7], [], 'layers.1');  wait_1 = None
        t_2: "f32[8, 16]" = torch.ops.aten.t.default(fetched_4)
        addmm_2: "f32[2, 16]" = torch.ops.aten.addmm.default(fetched_5, add, t_2);  t_2 = None
        relu_1: "f32[2, 16]" = torch.ops.aten.relu.default(addmm_2);  addmm_2 = None
        t_3: "f32[16, 8]" = torch.ops.aten.t.default(fetched_6)
        addmm_3: "f32[2, 8]" = torch.ops.aten.addmm.default(fetched_7, relu_1, t_3);  relu_1 = t_3 = None
        slot_1: "u8[0]" = torch.ops.aten.empty.memory_format([0], dtype = torch.uint8, device = device(type='cpu'))
        release_1: "f32[0]" = torch.ops.fx_offload.release.default([fetched_4, fetched_5, fetched_6, fetched_7], [addmm_3], [slot_1], 'layers.1');  fetched_4 = fetched_5 = fetched_6 = fetched_7 = slot_1 = None
        slot_3: "u8[0]" = torch.ops.aten.empty.memory_format([0], dtype = torch.uint8, device = device(type='cpu'))
        refill = torch.ops.fx_offload.refill.default([fetched, fetched_1, fetched_2, fetched_3], [arg0_1, arg1_1, arg3_1, arg4_1], [release_1, release], slot_3, 'layers.0');  arg0_1 = arg1_1 = arg3_1 = arg4_1 = release_1 = release = refill = None
        add_1: "f32[2, 8]" = torch.ops.aten.add.Tensor(add, addmm_3);  add = addmm_3 = None
        wait_2 = torch.ops.fx_offload.wait.default([fetched_8, fetched_9, fetched_10, fetched_11], [slot_3], 'layers.2');  wait_2 = None
        t_4: "f32[8, 16]" = torch.ops.aten.t.default(fetched_8)
        addmm_4: "f32[2, 16]" = torch.ops.aten.addmm.default(fetched_9, add_1, t_4);  t_4 = None
        relu_2: "f32[2, 16]" = torch.ops.aten.relu.default(addmm_4);  addmm_4 = None
        t_5: "f32[16, 8]" = torch.ops.aten.t.default(fetched_10)
        addmm_5: "f32[2, 8]" = torch.ops.aten.addmm.default(fetched_11, relu_2, t_5);  relu_2 = t_5 = None
        slot_2: "u8[0]" = torch.ops.aten.empty.memory_format([0], dtype = torch.uint8, device = device(type='cpu'))
        release_2: "f32[0]" = torch.ops.fx_offload.release.default([fetched_8, fetched_9, fetched_10, fetched_11], [addmm_5], [slot_2], 'layers.2');  fetched_8 = fetched_9 = fetched_10 = fetched_11 = slot_2 = release_2 = None
        add_2: "f32[2, 8]" = torch.ops.aten.add.Tensor(add_1, addmm_5);  add_1 = addmm_5 = None
        t_6: "f32[8, 8]" = torch.ops.aten.t.default(arg13_1);  arg13_1 = None
        mm: "f32[2, 8]" = torch.ops.aten.mm.default(add_2, t_6);  add_2 = t_6 = None
        join = torch.ops.fx_offload.join.default([fetched, fetched_1, fetched_2, fetched_3], [mm], slot_3, 'layers.0');  fetched = fetched_1 = fetched_2 = fetched_3 = slot_3 = join = None
        return (mm,)""",
        )

    def test_layer_stack_two_head_regions(self):
        """prefetch=3, prefetch_head=2: layers.0 and layers.1 come from head buffers and two more
        regions may be fetched beside them; their refills are the last two copies of the call, in
        region order, after the last fetch."""
        text = self.explain(seeded(Stack, n=4), ["layers.*"], torch.randn(2, 8), prefetch=3, prefetch_head=2)
        self.assertExpectedInline(
            text,
            """\
# graph 1 of 1
head = head('layers.0', [layers.0.fc1.weight, layers.0.fc1.bias, layers.0.fc2.weight, layers.0.fc2.bias])
head_1 = head('layers.1', [layers.1.fc1.weight, layers.1.fc1.bias, layers.1.fc2.weight, layers.1.fc2.bias])
fetch_2 = fetch('layers.2', [layers.2.fc1.weight, layers.2.fc1.bias, layers.2.fc2.weight, layers.2.fc2.bias], after=[])
fetch_3 = fetch('layers.3', [layers.3.fc1.weight, layers.3.fc1.bias, layers.3.fc2.weight, layers.3.fc2.bias], after=[])
wait = wait('layers.0', fetched..fetched_3, issued=[fetched_4, fetched_8, fetched_12])
release = release('layers.0', fetched..fetched_3, readers=[addmm_1])
wait_1 = wait('layers.1', fetched_4..fetched_7, issued=[])
release_1 = release('layers.1', fetched_4..fetched_7, readers=[addmm_3])
wait_2 = wait('layers.2', fetched_8..fetched_11, issued=[])
release_2 = release('layers.2', fetched_8..fetched_11, readers=[addmm_5])
refill = refill('layers.0', fetched..fetched_3, after=[release_2, release])
wait_3 = wait('layers.3', fetched_12..fetched_15, issued=[slot_4])
release_3 = release('layers.3', fetched_12..fetched_15, readers=[addmm_7])
refill_1 = refill('layers.1', fetched_4..fetched_7, after=[release_3, release_1])
join = join('layers.0', fetched..fetched_3, issued=[mm])
join_1 = join('layers.1', fetched_4..fetched_7, issued=[mm])
reads of layers.0:
  t <- fetched (layers.0.fc1.weight)
  addmm <- fetched_1 (layers.0.fc1.bias)
  t_1 <- fetched_2 (layers.0.fc2.weight)
  addmm_1 <- fetched_3 (layers.0.fc2.bias)
reads of layers.1:
  t_2 <- fetched_4 (layers.1.fc1.weight)
  addmm_2 <- fetched_5 (layers.1.fc1.bias)
  t_3 <- fetched_6 (layers.1.fc2.weight)
  addmm_3 <- fetched_7 (layers.1.fc2.bias)
reads of layers.2:
  t_4 <- fetched_8 (layers.2.fc1.weight)
  addmm_4 <- fetched_9 (layers.2.fc1.bias)
  t_5 <- fetched_10 (layers.2.fc2.weight)
  addmm_5 <- fetched_11 (layers.2.fc2.bias)
reads of layers.3:
  t_6 <- fetched_12 (layers.3.fc1.weight)
  addmm_6 <- fetched_13 (layers.3.fc1.bias)
  t_7 <- fetched_14 (layers.3.fc2.weight)
  addmm_7 <- fetched_15 (layers.3.fc2.bias)""",
        )

    def test_layer_stack_heads_passed_as_inputs(self):
        """The default without CUDA graphs: the heads (layers.0 and .1) have no op, their reads
        stay on the graph's inputs, which the wrapper fills with the head buffers; layers.2 and .3
        are fetched as ever, both at the start (prefetch=3: the two heads and two more)."""
        model, x = seeded(Stack, n=4), torch.randn(2, 8)
        text = self.explain(model, ["layers.*"], x, prefetch=3, prefetch_head=2, heads_as_inputs=True)
        self.assertExpectedInline(
            text,
            """\
# graph 1 of 1
fetch = fetch('layers.2', [layers.2.fc1.weight, layers.2.fc1.bias, layers.2.fc2.weight, layers.2.fc2.bias], after=[])
fetch_1 = fetch('layers.3', [layers.3.fc1.weight, layers.3.fc1.bias, layers.3.fc2.weight, layers.3.fc2.bias], after=[])
wait = wait('layers.2', fetched..fetched_3, issued=[fetched_4])
release = release('layers.2', fetched..fetched_3, readers=[addmm_5])
wait_1 = wait('layers.3', fetched_4..fetched_7, issued=[])
release_1 = release('layers.3', fetched_4..fetched_7, readers=[addmm_7])
reads of layers.0 (its head buffers passed as inputs):
  t <- arg0_1 (layers.0.fc1.weight)
  addmm <- arg1_1 (layers.0.fc1.bias)
  t_1 <- arg3_1 (layers.0.fc2.weight)
  addmm_1 <- arg4_1 (layers.0.fc2.bias)
reads of layers.1 (its head buffers passed as inputs):
  t_2 <- arg5_1 (layers.1.fc1.weight)
  addmm_2 <- arg6_1 (layers.1.fc1.bias)
  t_3 <- arg7_1 (layers.1.fc2.weight)
  addmm_3 <- arg8_1 (layers.1.fc2.bias)
reads of layers.2:
  t_4 <- fetched (layers.2.fc1.weight)
  addmm_4 <- fetched_1 (layers.2.fc1.bias)
  t_5 <- fetched_2 (layers.2.fc2.weight)
  addmm_5 <- fetched_3 (layers.2.fc2.bias)
reads of layers.3:
  t_6 <- fetched_4 (layers.3.fc1.weight)
  addmm_6 <- fetched_5 (layers.3.fc1.bias)
  t_7 <- fetched_6 (layers.3.fc2.weight)
  addmm_7 <- fetched_7 (layers.3.fc2.bias)""",
        )

    def test_layer_stack_refill_estimated(self):
        """refill_in_graph 'auto' (the default) on a device of round figures (1 GFLOP/s, 1 GB/s,
        0.1 GB/s host to device): the tail after layers.3's wait is its two addmm and the head's
        mm (512, 512 and 256 FLOPs; 768, 736 and 384 bytes: memory-bound), 10.89 us with a 3 us
        launch each; doubled, at 0.1 GB/s: 2177 bytes are copied in the call, all of layers.0's
        1120 and 1057 of layers.1's, the wrapper copies the last 63 after it."""
        figures = estimate.DeviceFigures({torch.float32: 1e9}, 1e9, 1e8)
        with mock.patch.object(estimate, "device_figures", lambda device_type: figures):
            text = self.explain(
                seeded(Stack, n=4),
                ["layers.*"],
                torch.randn(2, 8),
                prefetch=3,
                prefetch_head=2,
                refill_in_graph="auto",
            )
        self.assertExpectedInline(
            "\n".join(line for line in text.splitlines() if "refill" in line or "join" in line),
            """\
refill = refill('layers.0', fetched..fetched_3, after=[release_2, release], in_graph=1120)
refill_1 = refill('layers.1', fetched_4..fetched_7, after=[release_3, release_1], in_graph=1057)
join = join('layers.0', fetched..fetched_3, issued=[mm])
join_1 = join('layers.1', fetched_4..fetched_7, issued=[mm])""",
        )

    def test_layer_stack_refill_in_graph(self):
        """refill_in_graph=1500 with two heads of 1120 bytes each: the first head's refill copies
        all its bytes inside the call (its in_graph), the second its first 380; the wrapper
        copies the remaining 740 after the call."""
        text = self.explain(
            seeded(Stack, n=4),
            ["layers.*"],
            torch.randn(2, 8),
            prefetch=3,
            prefetch_head=2,
            refill_in_graph=1500,
        )
        self.assertExpectedInline(
            text,
            """\
# graph 1 of 1
head = head('layers.0', [layers.0.fc1.weight, layers.0.fc1.bias, layers.0.fc2.weight, layers.0.fc2.bias])
head_1 = head('layers.1', [layers.1.fc1.weight, layers.1.fc1.bias, layers.1.fc2.weight, layers.1.fc2.bias])
fetch_2 = fetch('layers.2', [layers.2.fc1.weight, layers.2.fc1.bias, layers.2.fc2.weight, layers.2.fc2.bias], after=[])
fetch_3 = fetch('layers.3', [layers.3.fc1.weight, layers.3.fc1.bias, layers.3.fc2.weight, layers.3.fc2.bias], after=[])
wait = wait('layers.0', fetched..fetched_3, issued=[fetched_4, fetched_8, fetched_12])
release = release('layers.0', fetched..fetched_3, readers=[addmm_1])
wait_1 = wait('layers.1', fetched_4..fetched_7, issued=[])
release_1 = release('layers.1', fetched_4..fetched_7, readers=[addmm_3])
wait_2 = wait('layers.2', fetched_8..fetched_11, issued=[])
release_2 = release('layers.2', fetched_8..fetched_11, readers=[addmm_5])
refill = refill('layers.0', fetched..fetched_3, after=[release_2, release], in_graph=1120)
wait_3 = wait('layers.3', fetched_12..fetched_15, issued=[slot_4])
release_3 = release('layers.3', fetched_12..fetched_15, readers=[addmm_7])
refill_1 = refill('layers.1', fetched_4..fetched_7, after=[release_3, release_1], in_graph=380)
join = join('layers.0', fetched..fetched_3, issued=[mm])
join_1 = join('layers.1', fetched_4..fetched_7, issued=[mm])
reads of layers.0:
  t <- fetched (layers.0.fc1.weight)
  addmm <- fetched_1 (layers.0.fc1.bias)
  t_1 <- fetched_2 (layers.0.fc2.weight)
  addmm_1 <- fetched_3 (layers.0.fc2.bias)
reads of layers.1:
  t_2 <- fetched_4 (layers.1.fc1.weight)
  addmm_2 <- fetched_5 (layers.1.fc1.bias)
  t_3 <- fetched_6 (layers.1.fc2.weight)
  addmm_3 <- fetched_7 (layers.1.fc2.bias)
reads of layers.2:
  t_4 <- fetched_8 (layers.2.fc1.weight)
  addmm_4 <- fetched_9 (layers.2.fc1.bias)
  t_5 <- fetched_10 (layers.2.fc2.weight)
  addmm_5 <- fetched_11 (layers.2.fc2.bias)
reads of layers.3:
  t_6 <- fetched_12 (layers.3.fc1.weight)
  addmm_6 <- fetched_13 (layers.3.fc1.bias)
  t_7 <- fetched_14 (layers.3.fc2.weight)
  addmm_7 <- fetched_15 (layers.3.fc2.bias)""",
        )

    def test_layer_stack_prefetch_0(self):
        text = self.explain(
            seeded(Stack, n=2), ["layers.*"], torch.randn(2, 8), prefetch=0, prefetch_head=0, compact=False
        )
        self.assertExpectedInline(
            text,
            """\
# graph 1 of 1
# regions: layers.0, layers.1
# arg0_1: layers.0.fc1.weight
# arg1_1: layers.0.fc1.bias
# arg3_1: layers.0.fc2.weight
# arg4_1: layers.0.fc2.bias
# arg5_1: layers.1.fc1.weight
# arg6_1: layers.1.fc1.bias
# arg7_1: layers.1.fc2.weight
# arg8_1: layers.1.fc2.bias
    def forward(self, arg0_1: "f32[16, 8]", arg1_1: "f32[16]", arg2_1: "f32[2, 8]", arg3_1: "f32[8, 16]", arg4_1: "f32[8]", arg5_1: "f32[16, 8]", arg6_1: "f32[16]", arg7_1: "f32[8, 16]", arg8_1: "f32[8]", arg9_1: "f32[8, 8]"):
        fetch = torch.ops.fx_offload.fetch.default([arg0_1, arg1_1, arg3_1, arg4_1], [], 'layers.0');  arg0_1 = arg1_1 = arg3_1 = arg4_1 = None
        fetched: "f32[16, 8]" = fetch[0]
        fetched_1: "f32[16]" = fetch[1]
        fetched_2: "f32[8, 16]" = fetch[2]
        fetched_3: "f32[8]" = fetch[3];  fetch = None
        wait = torch.ops.fx_offload.wait.default([fetched, fetched_1, fetched_2, fetched_3], [], 'layers.0');  wait = None
        t: "f32[8, 16]" = torch.ops.aten.t.default(fetched)
        addmm: "f32[2, 16]" = torch.ops.aten.addmm.default(fetched_1, arg2_1, t);  t = None
        relu: "f32[2, 16]" = torch.ops.aten.relu.default(addmm);  addmm = None
        t_1: "f32[16, 8]" = torch.ops.aten.t.default(fetched_2)
        addmm_1: "f32[2, 8]" = torch.ops.aten.addmm.default(fetched_3, relu, t_1);  relu = t_1 = None
        slot: "u8[0]" = torch.ops.aten.empty.memory_format([0], dtype = torch.uint8, device = device(type='cpu'))
        release: "f32[0]" = torch.ops.fx_offload.release.default([fetched, fetched_1, fetched_2, fetched_3], [addmm_1], [slot], 'layers.0');  fetched = fetched_1 = fetched_2 = fetched_3 = slot = None
        fetch_1 = torch.ops.fx_offload.fetch.default([arg5_1, arg6_1, arg7_1, arg8_1], [release], 'layers.1');  arg5_1 = arg6_1 = arg7_1 = arg8_1 = release = None
        fetched_4: "f32[16, 8]" = fetch_1[0]
        fetched_5: "f32[16]" = fetch_1[1]
        fetched_6: "f32[8, 16]" = fetch_1[2]
        fetched_7: "f32[8]" = fetch_1[3];  fetch_1 = None
        add: "f32[2, 8]" = torch.ops.aten.add.Tensor(arg2_1, addmm_1);  arg2_1 = addmm_1 = None
        wait_1 = torch.ops.fx_offload.wait.default([fetched_4, fetched_5, fetched_6, fetched_7], [], 'layers.1');  wait_1 = None
        t_2: "f32[8, 16]" = torch.ops.aten.t.default(fetched_4)
        addmm_2: "f32[2, 16]" = torch.ops.aten.addmm.default(fetched_5, add, t_2);  t_2 = None
        relu_1: "f32[2, 16]" = torch.ops.aten.relu.default(addmm_2);  addmm_2 = None
        t_3: "f32[16, 8]" = torch.ops.aten.t.default(fetched_6)
        addmm_3: "f32[2, 8]" = torch.ops.aten.addmm.default(fetched_7, relu_1, t_3);  relu_1 = t_3 = None
        slot_1: "u8[0]" = torch.ops.aten.empty.memory_format([0], dtype = torch.uint8, device = device(type='cpu'))
        release_1: "f32[0]" = torch.ops.fx_offload.release.default([fetched_4, fetched_5, fetched_6, fetched_7], [addmm_3], [slot_1], 'layers.1');  fetched_4 = fetched_5 = fetched_6 = fetched_7 = slot_1 = release_1 = None
        add_1: "f32[2, 8]" = torch.ops.aten.add.Tensor(add, addmm_3);  add = addmm_3 = None
        t_4: "f32[8, 8]" = torch.ops.aten.t.default(arg9_1);  arg9_1 = None
        mm: "f32[2, 8]" = torch.ops.aten.mm.default(add_1, t_4);  add_1 = t_4 = None
        return (mm,)""",
        )

    def test_module_called_twice(self):
        text = self.explain(seeded(CalledTwice), ["shared"], torch.randn(2, 8))
        self.assertExpectedInline(
            text,
            """\
# graph 1 of 1
head = head('shared', [shared.weight, shared.bias])
fetch_1 = fetch('shared@1', [shared.weight, shared.bias], after=[])
wait = wait('shared', fetched..fetched_1, issued=[fetched_2])
release = release('shared', fetched..fetched_1, readers=[addmm])
refill = refill('shared', fetched..fetched_1, after=[release])
wait_1 = wait('shared@1', fetched_2..fetched_3, issued=[slot_2])
release_1 = release('shared@1', fetched_2..fetched_3, readers=[addmm_2])
join = join('shared', fetched..fetched_1, issued=[addmm_2])
reads of shared:
  t <- fetched (shared.weight)
  addmm <- fetched_1 (shared.bias)
reads of shared@1:
  t_2 <- fetched_2 (shared.weight)
  addmm_2 <- fetched_3 (shared.bias)""",
        )

    def test_tied_embedding_and_head(self):
        text = self.explain(seeded(Tied), ["embed"], torch.tensor([[1, 2, 3]]))
        self.assertExpectedInline(
            text,
            """\
# graph 1 of 1
head = head('embed', [embed.weight])
fetch_1 = fetch('lm_head (not offloaded)', [embed.weight], after=[])
wait = wait('embed', [fetched], issued=[fetched_1])
release = release('embed', [fetched], readers=[embedding], written=[fetched])
refill = refill('embed', [fetched], after=[release])
wait_1 = wait('lm_head (not offloaded)', [fetched_1], issued=[slot_2])
release_1 = release('lm_head (not offloaded)', [fetched_1], readers=[mm])
join = join('embed', [fetched], issued=[_unsafe_view])
reads of embed:
  embedding <- fetched (embed.weight)
reads of lm_head (not offloaded):
  t_1 <- fetched_1 (embed.weight)""",
        )

    def test_graph_break_between_offloaded_blocks(self):
        text = self.explain(seeded(Broken), ["first", "second"], torch.randn(2, 8))
        self.assertExpectedInline(
            text,
            """\
# graph 1 of 2
head = head('first', [first.fc1.weight, first.fc1.bias, first.fc2.weight, first.fc2.bias])
wait = wait('first', fetched..fetched_3, issued=[])
release = release('first', fetched..fetched_3, readers=[addmm_1])
refill = refill('first', fetched..fetched_3, after=[release])
join = join('first', fetched..fetched_3, issued=[add])
reads of first:
  t <- fetched (first.fc1.weight)
  addmm <- fetched_1 (first.fc1.bias)
  t_1 <- fetched_2 (first.fc2.weight)
  addmm_1 <- fetched_3 (first.fc2.bias)

# graph 2 of 2
head = head('second', [second.fc1.weight, second.fc1.bias, second.fc2.weight, second.fc2.bias])
wait = wait('second', fetched..fetched_3, issued=[])
release = release('second', fetched..fetched_3, readers=[addmm_1])
refill = refill('second', fetched..fetched_3, after=[release])
join = join('second', fetched..fetched_3, issued=[add])
reads of second:
  t <- fetched (second.fc1.weight)
  addmm <- fetched_1 (second.fc1.bias)
  t_1 <- fetched_2 (second.fc2.weight)
  addmm_1 <- fetched_3 (second.fc2.bias)""",
        )

    def test_swapped_component_is_read_from_its_device_copy(self):
        """thinker is swapped and only read: the graph reads its inputs as the resident graph
        would, and the wrapper passes the component's device copies as those inputs; the visual
        tower inside it streams."""
        text = self.explain(
            seeded(Nested), {"visual": "stream", "thinker": "swap"}, torch.randn(2, 8), prefetch_head=0
        )
        self.assertExpectedInline(
            text,
            """\
# graph 1 of 1
fetch = fetch('thinker.visual', [thinker.visual.proj.weight, thinker.visual.proj.bias, thinker.visual.block.fc1.weight, thinker.visual.block.fc1.bias, thinker.visual.block.fc2.weight, thinker.visual.block.fc2.bias], after=[])
wait = wait('thinker.visual', fetched..fetched_5, issued=[])
release = release('thinker.visual', fetched..fetched_5, readers=[addmm_2])
reads of thinker.visual:
  t <- fetched (thinker.visual.proj.weight)
  addmm <- fetched_1 (thinker.visual.proj.bias)
  t_1 <- fetched_2 (thinker.visual.block.fc1.weight)
  addmm_1 <- fetched_3 (thinker.visual.block.fc1.bias)
  t_2 <- fetched_4 (thinker.visual.block.fc2.weight)
  addmm_2 <- fetched_5 (thinker.visual.block.fc2.bias)
reads of swapped component thinker (its device copies passed as inputs):
  native_layer_norm <- arg7_1 (thinker.norm.weight), arg8_1 (thinker.norm.bias)""",
        )
