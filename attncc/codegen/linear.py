"""Pattern -> the template variables of a linear-attention kernel (templates/linear.py.j2)."""
from attncc.spec.ir import TAYLOR_MAX_HEAD_DIM, Pattern

# phi of each feature map, for the generated module's docstring
FEATURE_DOCS = {
    "elu+1": "phi(x) = elu(x) + 1 (x + 1 where x > 0, exp(x) elsewhere), F = D features",
    "relu": "phi(x) = max(x, 0), F = D features",
    "identity": "phi(x) = x, F = D features",
    "performer": "FAVOR+, phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(F), x' = x / D^(1/4), W = "
                 "performer_projection(F, D, seed) (orthogonal random rows)",
    "cosformer": "cosFormer, phi(x_i) = [relu(x_i) cos(pi i / 2M), relu(x_i) sin(pi i / 2M)], M = max(n_q, n_k), "
                 "F = 2 D features",
    "taylor": "2nd-order Taylor (Based), phi(x) = [x / D^(1/4), vec(x x^T) / sqrt(2 D), 1], F = 1 + D + D^2 "
              "features: phi(q).phi(k) = 1 + q.k / sqrt(D) + (q.k)^2 / (2 D)",
}


def linear_context(pattern: Pattern) -> dict:
    fm = pattern.feature_map
    if fm.name not in FEATURE_DOCS:
        raise NotImplementedError(f"{pattern.source}: the {fm.name!r} feature map has no kernel yet "
                                  f"(kernels exist for {', '.join(FEATURE_DOCS)})")
    return dict(feature_map=fm.name, feature_doc=FEATURE_DOCS[fm.name], features=fm.features, seed=fm.seed,
                causal=fm.causal, normalize=fm.normalize, max_head_dim=TAYLOR_MAX_HEAD_DIM)
