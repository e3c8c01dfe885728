"""The CLAD head's settings (``[train.clad]``): the paper's schedule by default,
with every later setting declared at the value that reproduces the runs made
before it (``added``). Profiles are the head's (``stages.heads.clad``)."""

from __future__ import annotations

from dataclasses import dataclass

from core.schema import Settings, setting


@dataclass(frozen=True)
class CladSettings(Settings):
    """CLAD's own settings; defaults are the paper's schedule ('paper' profile)."""

    epochs_contrastive: int = setting(200, low=0, help="epochs of phase 1 (contrastive)")
    epochs_finetune: int = setting(2000, low=0, help="epochs of phase 2 (fine-tune)")
    batch_contrastive: int = setting(8000, low=1, help="rows per phase-1 batch")
    batch_finetune: int = setting(100000, low=1, help="rows per phase-2 batch")
    lr: float = setting(2e-4, above=0, help="AdamW's learning rate")
    weight_decay: float = setting(1e-2, help="AdamW's weight decay")
    adaptor_dims: tuple[int, ...] = setting((1024, 512, 256), low=1, nonempty=True, help="the adaptor's layer widths")
    disc_hidden: int = setting(1024, low=1, help="the discriminator's hidden width")
    margin: float = setting(1.0, help="M of eq. 12")
    alpha: float = setting(1.0, help="alpha of eqs. 13-14")
    gamma: float = setting(-0.8)
    delta: float = setting(0.5, help="hinge margin of eqs. 21-23")
    score_loss: str = setting("hinge", choices=("hinge", "bce"), added="hinge",
                              help="L_d: hinge (eqs. 21-23) | bce (GLASS: graded, never flat)")
    contrast_normals_only: bool = setting(False)
    fusion_p: float = setting(0.5, low=0, high=1, help="probability that a local anomaly row is fused (eq. 4)")
    gas_steps: int = setting(20, low=0)
    gas_eta: float = setting(0.001)
    gas_project_every: int = setting(5, low=1)
    gas_noise: float = setting(0.015)
    gas_scale: str = setting("nn", choices=("nn", "absolute"),
                             help="nn: radii in units of the normal NN distance | absolute: docs/METHOD.md's constants")
    gas_nn_factor: float = setting(1.0, help="with gas_scale = nn: r1 = factor x median NN distance, r2 = 2 r1")
    gas_nn_stat: str = setting("median", choices=("median", "image_max"), added="median",
                               help="with gas_radius = class: r1 per class = factor x this statistic of held-out "
                                    "normal NN distances: median (over patches) | image_max (median over held-out "
                                    "images of each image's largest patch distance)")
    gas_shell: str = setting("fixed", choices=("fixed", "adaptive"), added="fixed",
                             help="fixed | adaptive (with gas_radius = class and gas_scale = nn): after every "
                                  "epoch each class's r1 shrinks while the held-out GAS rows are separated "
                                  "(AUROC >= gas_shell_target), grows when they are not, within gas_shell_min "
                                  ".. 1 x its configured r1 (stages/heads/clad_shell.py)")
    gas_shell_target: float = setting(0.95, above=0.5, below=1, added=0.95,
                                      help="with gas_shell = adaptive: the held-out GAS AUROC a class's shell "
                                           "must reach before it is tightened")
    gas_shell_min: float = setting(0.5, above=0, high=1, added=0.5,
                                   help="with gas_shell = adaptive: the tightest shell, a fraction of each "
                                        "class's configured r1")
    use_contrastive: bool = setting(True)
    use_gas: bool = setting(True)
    use_las: bool = setting(True)
    window_shards: int = setting(4, low=1)
    mix_classes: bool = setting(True, added=False,
                                help="every window of shards spread over the classes (cache.stream.interleaved_order)")
    gas_bn: str = setting("eval", choices=("eval", "train"), added="train",
                          help="eval: the ascent reads batch norm's running statistics, never updates them | train")
    gas_radius: str = setting("class", choices=("class", "global"), added="global",
                              help="class: r1 per class from its own NN distances (with gas_scale nn) | global")
    fusion_beta: str = setting("fresh", choices=("fresh", "stored"), added="stored",
                               help="fresh: eq. 4's beta redrawn every step from the batch's stored betas | stored")
    bn_refresh: bool = setting(True, added=False,
                               help="batch norm's statistics re-estimated on a sample of all classes after every epoch")
    bn_rows: int = setting(20000, low=2, added=20000,
                           help="normal rows of that sample (plus half as many local and global synthetic rows)")
    gas_direction: str = setting("noise", choices=("noise", "rows"), added="noise",
                                 help="noise (GLASS) | rows: displacements along differences of same-class rows")
    gas_rows_scale: float = setting(2.0, added=2.0,
                                    help="with gas_direction = rows: the shell's radii in units of the class r1")
    lr_schedule: str = setting("constant", choices=("constant", "cosine"), added="constant",
                               help="constant | cosine: lr decays to 0 over each phase's steps (stateless: resumable)")
    ema: float = setting(0.0, low=0, below=1, added=0.0,
                         help="decay per step of an average of the weights that is evaluated and kept; 0 = off")
    normal_jitter: float = setting(0.0, low=0, added=0.0,
                                   help="normal rows trained on with Gaussian noise of this norm, in units of "
                                        "their class's r1 (0 = off): unseen normal patches lie ~r1 from the "
                                        "nearest training patch, where GAS puts its shell")
    score_heads: str = setting("one", choices=("one", "class"), added="one",
                               help="one score output for every class (the paper) | class: one per label, each "
                                    "image scored by its class's (the classification head routes it)")
    keep_epoch: str = setting("probe", choices=("probe", "paper", "last"), added="probe",
                              help="which epoch each phase keeps: probe = its best probe_pixel; paper = the "
                                   "contrastive phase's best (the paper fine-tunes 'the best' phase-1 model) and the "
                                   "fine-tuning's last epoch; last = every phase's last")
    score_mix: str = setting("discriminator", choices=("discriminator", "probe", "blend", "distance"),
                             added="discriminator",
                             help="how a patch is scored: discriminator = its score s (the paper) | probe = per "
                                  "class, s, s + d or d (d: nearest-neighbour distance in the adaptor space, each "
                                  "in units of held-out normal patches), whichever scores the class's held-out "
                                  "probe best; classes with fewer than score_mix_min_images held-out images "
                                  "choose one together on their pooled probe (stages/heads/clad_mix.py) | "
                                  "blend = s + d, distance = d, for every class")
    score_mix_min_images: int = setting(5, low=1, added=5,
                                        help="with score_mix = probe: held-out images a class needs for its "
                                             "own choice (and the classes below it together for theirs)")
    score_mix_pool: str = setting("mean", choices=("mean", "rank"), added="mean",
                                  help="with score_mix = probe: how the classes with too few held-out images "
                                       "choose together: mean = the best mean probe metric | rank = the best "
                                       "mean rank, each class one vote (a class whose probe sees nothing, at "
                                       "or below chance for every candidate, cannot outweigh the others)")
    score_mix_space: str = setting("final", choices=("final", "contrastive", "probe"), added="final",
                                   help="with a score mix, where d is measured: final = after the kept model's "
                                        "adaptor | contrastive = after the adaptor the contrastive phase kept "
                                        "(fine-tuning serves the discriminator's score and moves it) | probe = "
                                        "both are candidates, chosen per class as the weights are (the model "
                                        "keeps the second adaptor where a class uses it)")
    score_mix_coreset: float = setting(1.0, above=0, high=1, added=1.0,
                                       help="with a score mix: the fraction of each chosen bank's rows kept by "
                                            "PatchCore's greedy coreset in its d space (1.0 = every row): the "
                                            "exact search over a large class's bank is most of its scoring time")
    score_mix_anomalies: int = setting(4, low=4, added=4,
                                       help="with score_mix = probe: CutPaste/Scar probe images per class, at "
                                            "least, the mix is chosen on (a class with few held-out images gets "
                                            "more versions of each; the epochs are selected on the first four "
                                            "versions whatever this is): with one held-out image and four "
                                            "versions the small classes' choice is a coin toss")
    score_mix_versions: int = setting(4, low=4, added=4,
                                      help="with score_mix = probe: CutPaste/Scar versions of each held-out "
                                           "image, at least, the mix is chosen on: with ten held-out images "
                                           "and four versions of each, four draws of the versions chose three "
                                           "different mixes for bottle, with sixteen one (docs/RESULTS.md, "
                                           "round 12)")
    score_mix_coreset_block: int = setting(200_000, low=1, added=200_000,
                                           help="with score_mix_coreset < 1: rows per greedy selection; a "
                                                "larger bank is cut into blocks of contiguous rows, each reduced "
                                                "on its own (stages/search.py, greedy_coreset): one selection "
                                                "costs rows x picks, so smaller blocks are faster and cover a "
                                                "little less (docs/RESULTS.md, rounds 11 and 14)")
