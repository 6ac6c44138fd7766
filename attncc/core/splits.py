"""The compiler's own params of split patterns (attncc.analysis.residue writes the kernels' pattern
with them, attncc.runtime.residue sets them per part of a call). A spec may name its own params so
too: then its pattern is not split (attncc.analysis.residue refuses names it would add), so these
never meet a spec's."""

# residue classes: i -> STEP*i + CQ, j -> STEP*j + CK (the spec's own positions at 1, 0, 0)
STEP, CQ, CK = "_rs_step", "_rs_cq", "_rs_ck"
RESIDUE_PARAMS = ((STEP, 1), (CQ, 0), (CK, 0))

# summary columns apart: j -> SK*j + CK2; PART 0 the rest, 1 the columns, WHOLE the spec's mask
SK, CK2, PART = "_cs_sk", "_cs_ck", "_cs_part"
WHOLE = 2
COLUMN_PARAMS = ((SK, 1), (CK2, 0), (PART, WHOLE))
