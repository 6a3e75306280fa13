"""Check K-means word labels against ground-truth masks in swap scenes."""
import sys, numpy as np, torch
from PIL import Image
from dpl_edit import load_model, invert
from dpl_edit.bench.world_set import world_scene
from dpl_edit.bench.scenes import load_rgb
torch.set_num_threads(1)
m = load_model()
for sid in sys.argv[1:]:
    split, idx = sid.split("-")
    s = world_scene(split, int(idx))
    words = list(s.masks)
    inv = invert(m, Image.fromarray(load_rgb(s.image)), s.source, method="dpl", steps=50, words=words, progress=False)
    for w in words:
        est = np.asarray(inv.extras[f"word-{w}"].resize(s.masks[w].shape[::-1], Image.NEAREST)) > 127
        for o in words:
            gt = s.masks[o]
            cover = (est & gt).sum() / max(gt.sum(), 1)
            print(sid, f"cluster of '{w}' covers {100*cover:.0f}% of object '{o}'", f"(cluster size {est.mean()*100:.0f}% of image)")
    print(sid, "source:", s.source)
