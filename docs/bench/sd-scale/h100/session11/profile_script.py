"""Where a graphed DPL token update's time goes at SD scale, and whether channels-last pays."""
import time, sys
import torch
from PIL import Image
from dpl_edit.bench.sd_scale import random_sd_model
from dpl_edit.bench.world_set import world_scene
from dpl_edit.engine.inversion import invert
from dpl_edit.engine.model import use_cuda_graphs
from dpl_edit.engine.timers import collect

dev = torch.device("cuda")
model = random_sd_model(dev, torch.float16)
use_cuda_graphs(model)
scene = world_scene("val", 0)
image = Image.fromarray(scene.source_image())
def dpl(steps):
    return invert(model, image, scene.source, method="dpl", steps=steps, progress=False, words=list(scene.masks))
def timed_dpl(steps):
    torch.cuda.synchronize(); start = time.perf_counter()
    with collect() as totals:
        r = dpl(steps)
    torch.cuda.synchronize()
    return time.perf_counter() - start, r, dict(totals)
dpl(1)
wall, r, totals = timed_dpl(5)
print(f"DPL 5 steps graphed: {wall:.2f} s, passes {r.unet_evals}, timers {({k: round(v, 3) for k, v in totals.items()})}")
acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=acts) as prof:
    r = dpl(3); torch.cuda.synchronize()
ka = prof.key_averages()
print(ka.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
sys.stdout.flush()
nchw, r1, _ = timed_dpl(10)
model.unet.to(memory_format=torch.channels_last)
use_cuda_graphs(model)
dpl(1)
cl, r2, _ = timed_dpl(10)
d = (r1.dynamic_tokens.vectors - r2.dynamic_tokens.vectors).abs().max().item()
print(f"DPL 10 steps graphed: NCHW {nchw:.2f} s, channels-last {cl:.2f} s, word-vector diff {d:.2e}")
