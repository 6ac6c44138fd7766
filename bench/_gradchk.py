import os, sys, importlib, torch, attncc
from attncc.spec import load_spec
sys.path.insert(0, "bench")
from common import documents
for name in ("causal", "document", "softcap", "alibi"):
    mod = importlib.import_module(f"generated.{name}")
    p = load_spec(f"specs/{name}.toml")
    torch.manual_seed(0)
    B, H, N, D = 2, 8, 1024, 128
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    kw = {"doc": documents(B, N)} if name == "document" else {}
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attncc.reference(p, qd, kd, vd, **kw)
    rg = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    for flag in ("0", "1", "2"):
        for kern in ("", "_DKDV", "_DQ"):
            os.environ["ATTNCC_CONFIG" + kern] = {"": "BLOCK_M=64,BLOCK_N=64,num_warps=4,num_stages=3",
                "_DKDV": "BLOCK_M=64,BLOCK_N=64,num_warps=4,num_stages=2", "_DQ": "BLOCK_M=128,BLOCK_N=64,num_warps=8,num_stages=3"}[kern] + f",packed_exp={flag}"
        if name == "document":  # the backward takes the forward's tile shape with forced configs as given
            pass
        o = mod.attention(q, k, v, **kw)
        g = torch.autograd.grad(o, (q, k, v), do)
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip((o,) + g, (ref,) + rg)]
        print(f"{name:9s} packed_exp={flag}: rel err o {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}", flush=True)
