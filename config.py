"""Command-line flags and the three configurations built from them once: ModelConfig,
LossWeights and TrainConfig. Flag names follow the RAM code the seed forked, so the seed's
commands keep working; four of that code's flags are gone (README.md, "Flags", says which)."""

import argparse
import os
import sys
from dataclasses import dataclass, fields

from datasets import DATASETS, DIGIT, DataSpec
from model import LossWeights
from modules import (
    BASELINES,
    CORES,
    GLIMPSE_ENCODERS,
    LOCATION_GRADS,
    OBJECTIVES,
    POLICIES,
    POLICY_INPUTS,
    PROBE_INPUTS,
    REWARDS,
    WRITES,
    ModelConfig,
    check_learns,
)
from utils import OneLineParser, UserError, str2bool


def _bool(text):
    try:
        return str2bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"whole number >= {low}"
    return parse


def _int_between(low, high):
    at_least = _int_at_least(low)

    def parse(text):
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value
    parse.__name__ = f"whole number in {low}..{high}"
    return parse


positive_int = _int_at_least(1)
# NumPy takes seeds below 2**32, and each torchrun process seeds with random_seed + rank.
MAX_SEED = 2**31 - 1


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _weight(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def _glimpse_flags(p):
    glimpse = p.add_argument_group("glimpse sensor and networks")
    glimpse.add_argument("--patch_size", type=positive_int, default=None,
                         help="side g of the smallest (finest) patch of a glimpse, in pixels "
                         "(default: the dataset's, see --dataset)")
    glimpse.add_argument("--glimpse_scale", type=positive_int, default=None,
                         help="each further patch is this many times wider: g, g*s, g*s^2, ... "
                         "(default: the dataset's, see --dataset)")
    glimpse.add_argument("--num_patches", type=positive_int, default=None,
                         help="patches per glimpse, each pooled down to g x g (default: the "
                         "dataset's, see --dataset)")
    glimpse.add_argument("--glimpse_hidden", type=positive_int, default=128,
                         help="width of the layer that reads the patches ('what')")
    glimpse.add_argument("--loc_hidden", type=positive_int, default=128,
                         help="width of the layer that reads the location ('where')")
    glimpse.add_argument("--glimpse_encoder", choices=GLIMPSE_ENCODERS, default="linear",
                         help="the layer that reads the patches: linear (the seed's), or conv: "
                         "the k patches stacked as the k*C channels of one g x g image, two 3x3 "
                         "convolutions of 32 maps, then a linear layer to --glimpse_hidden "
                         "(filters shared across the patch, for several times the arithmetic)")


def _policy_flags(core):
    """The policy's flags, in the "core and policy" group `core`."""
    core.add_argument("--std", type=positive_float, default=None,
                      help="standard deviation of the Gaussian location policy (locations are "
                      "in [-1, 1]; default: the dataset's, 0.05 on cifar10, 0.15 on mnist, 0.25 "
                      "on translated and cluttered canvases)")
    core.add_argument("--std_final", type=positive_float, default=None,
                      help="anneal the learned policy's std from --std at the first epoch to "
                      "this at the last of --epochs (more than one), by the same factor every "
                      "epoch; a resume with a new --epochs recomputes the anneal to end there. "
                      "Evaluation samples with the checkpoint's epoch's value (default: --std "
                      "throughout)")
    core.add_argument("--learn_std", type=_bool, default=False,
                      help="make the learned policy's std a weight, one per glimpse and axis, "
                      "starting at --std: REINFORCE moves it like the mean, and "
                      "--entropy_weight rewards keeping it wide (default: --std throughout)")
    core.add_argument("--policy_epochs", type=positive_int, default=None,
                      help="the learned policy learns for this many epochs, then is frozen: "
                      "every glimpse goes where it aims, without exploration noise, and the "
                      "rest of the model trains and is tested on those exact paths (default: "
                      "it learns throughout)")
    core.add_argument("--policy", choices=tuple(POLICIES), default="learned",
                      help="where glimpses go: learned (REINFORCE); the ablations random "
                      "(uniform), centre, or grid (a fixed raster scan that covers the image)")
    core.add_argument("--policy_input", choices=POLICY_INPUTS, default="state",
                      help="what the learned policy reads: the state h; the state and the index "
                      "of the glimpse it places (state_step); the state, around a learned "
                      "per-glimpse offset that starts at the grid scan (grid_prior); or the "
                      "state and the index, moving the mean of each glimpse only inside its "
                      "cell of the fixed grid scan (grid_local)")
    core.add_argument("--location_grad", choices=LOCATION_GRADS, default="none",
                      help="how the learned policy learns: REINFORCE alone (none, RAM's); or "
                      "also from every loss's gradient (pathwise): the location is the "
                      "policy's mean plus its noise, and the sensor reads between pixels, "
                      "bilinearly, so the glimpse is differentiable in it (and --write=glimpse "
                      "writes bilinearly; --reinforce_weight=0 leaves the gradient alone)")
    core.add_argument("--baseline", choices=BASELINES, default="shared",
                      help="REINFORCE's value estimate: one linear head for every step (shared) "
                      "or one head per step (per_step)")


def _core_flags(p):
    core = p.add_argument_group("core and policy")
    core.add_argument("--num_glimpses", type=positive_int, default=None,
                      help="glimpses per image (recurrent steps; default: the dataset's, see "
                      "--dataset)")
    core.add_argument("--hidden_size", type=positive_int, default=256,
                      help="width of the core RNN's state h_t")
    core.add_argument("--core", choices=tuple(CORES), default="rnn",
                      help="the recurrence that integrates the glimpses: rnn, h_t = relu(W_g g_t "
                      "+ W_h h_{t-1}) (the seed's); lstm or gru, gated cells that can keep what "
                      "early glimpses saw (the LSTM's memory cell stays inside the rollout; "
                      "h_t is what the policy, decoder and probe read)")
    _policy_flags(core)
    core.add_argument("--M", type=positive_int, default=10,
                      help="Monte Carlo samples of the glimpse path averaged at validation and "
                      "test")
    core.add_argument("--eval_chunk", type=positive_int, default=2048,
                      help="most images (paths x batch) in one evaluation forward pass; bounds "
                      "its memory whatever --M is (at least one path of a batch per pass)")
    core.add_argument("--linear_eval", type=_bool, default=True,
                      help="with --is_train=false: also fit a logistic regression on the frozen "
                      "codes of the training images and report its test accuracy")
    core.add_argument("--linear_eval_features", choices=FEATURES, default="code",
                      help="what --linear_eval reads: code: the code the probe reads "
                      "(--probe_input); glimpses: the glimpse network's T outputs g_1..g_T side "
                      "by side; states: the core's T states h_1..h_T side by side")


def _code_flags(loss):
    """The flags of what the code is trained to do besides the linear reconstruction (a decoder
    that writes, a decoder with a hidden layer, the contrastive loss), in the "objective and
    loss weights" group `loss`."""
    loss.add_argument("--write", choices=WRITES, default="none",
                      help="none: each step's increment is W h_t + b (the seed's linear decoder); "
                      "glimpse: plus V h_t written back where its glimpse was taken, through the "
                      "retina's adjoint, so that detail lands where it was seen wherever the "
                      "policy looked (no Gram form: training builds the T canvases)")
    loss.add_argument("--decoder_hidden", type=positive_int, default=None,
                      help="left out: the linear decoder (the seed's, with the Gram form); N: "
                      "it also reads the code s_t through a ReLU layer of N units, x_hat_t = W s_t "
                      "+ t b + V relu(U s_t + c), so that the code need not be a linear image of "
                      "the reconstruction (no Gram form: training builds the T canvases)")
    loss.add_argument("--contrast_dim", type=positive_int, default=None,
                      help="left out: reconstruction alone; N: also SimCLR's contrastive loss, "
                      "through a head of N outputs on the code: every training image comes as "
                      "two random views (a resized crop, a flip, colour changes; cifar10 only), "
                      "each rolled out as an image, and each view's code must pick out the "
                      "other's among the batch's (no label; twice the training arithmetic)")
    loss.add_argument("--temperature", type=positive_float, default=0.5,
                      help="temperature of the contrastive loss's softmax over cosine "
                      "similarities (with --contrast_dim)")


def _loss_flags(p):
    loss = p.add_argument_group("objective and loss weights")
    loss.add_argument("--objective", choices=OBJECTIVES, default="unsupervised",
                      help="unsupervised: reconstruction trains the model and picks its "
                      "checkpoint, labels reach only a probe on the detached code; supervised: "
                      "RAM's hybrid loss")
    loss.add_argument("--reward", choices=REWARDS, default="sum",
                      help="unsupervised reward of a location: sum: minus the errors after its "
                      "glimpse and every later one; gain: how much its own glimpse lowered the "
                      "error; final: minus the error after the last glimpse, the figure PSNR "
                      "reports")
    _code_flags(loss)
    loss.add_argument("--probe_input", choices=PROBE_INPUTS, default="summed",
                      help="what the classifier reads: summed: s_T = h_1 + ... + h_T, the code "
                      "the decoder reads; last: h_T")
    for name, default, what in (
        ("recon_weight", 1.0, "reconstruction MSE"),
        ("classify_weight", 1.0, "classification NLL (the probe's, under unsupervised)"),
        ("reinforce_weight", 1.0, "REINFORCE term of the location policy"),
        ("baseline_weight", 1.0, "baseline's MSE to the return"),
        ("entropy_weight", 0.0, "learned std's entropy (a bonus for exploring, subtracted; "
         "needs --learn_std=true)"),
        ("contrast_weight", 1.0, "contrastive loss (with --contrast_dim)"),
    ):
        loss.add_argument(f"--{name}", type=_weight, default=default,
                          help=f"weight of the {what} in the loss")


def _data_flags(p):
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="cifar10",
                      help="cifar10; mnist; translated (a digit at a random place on a blank "
                      "canvas); cluttered (the same plus 8x8 distractors). Each sets the "
                      "glimpse flags left open: 9 x 6x6, 3 scales on cifar10; 6 x 8x8, 1 scale "
                      "on mnist; 8 x 12x12 on a canvas, 3 scales on 60x60, 4 on 100x100")
    data.add_argument("--data_dir", default="./data",
                      help="where CIFAR-10 is looked for and cached, and MNIST is read from "
                      "(MNIST/raw/, torchvision's layout)")
    data.add_argument("--canvas_size", type=_int_at_least(DIGIT), default=60,
                      help="side of the translated and cluttered canvases, in pixels")
    data.add_argument("--distractors", type=_int_at_least(0), default=None,
                      help="8x8 distractors per cluttered canvas (default: 4, or 8 on canvases "
                      "of 100 px and more, as in RAM's benchmarks)")
    data.add_argument("--valid_size", type=_fraction, default=0.1,
                      help="fraction of the training split held out for validation (fixed split)")
    data.add_argument("--batch_size", type=_int_at_least(2), default=128,
                      help="images per batch (per process under torchrun); at least 2, as the "
                      "probe standardises over the batch")
    data.add_argument("--num_workers", type=_int_between(0, os.cpu_count() or 1), default=0,
                      help="worker processes that assemble batches, at most one per CPU; the "
                      "data is in memory, so 0 is usually fastest")


def _training_flags(p):
    train = p.add_argument_group("training")
    train.add_argument("--is_train", type=_bool, default=True,
                       help="true: train; false: test a checkpoint on the test split")
    train.add_argument("--epochs", type=positive_int, default=200,
                       help="most epochs to train")
    train.add_argument("--init_lr", type=positive_float, default=3e-4,
                       help="Adam's initial learning rate")
    train.add_argument("--policy_lr", type=positive_float, default=None,
                       help="the learned policy's own initial learning rate (the location "
                       "network's weights; the schedule moves it by the same factors as "
                       "--init_lr). Default: --init_lr, one rate for every weight")
    train.add_argument("--lr_patience", type=positive_int, default=20,
                       help="epochs without a better validation score (PSNR under unsupervised, "
                       "accuracy under supervised) before the learning "
                       "rate is cut by 10x (--schedule=plateau)")
    train.add_argument("--train_patience", type=positive_int, default=50,
                       help="epochs without a better validation score before training stops")
    train.add_argument("--schedule", choices=SCHEDULES, default="plateau",
                       help="how the learning rate moves: plateau: cut by 10x after "
                       "--lr_patience epochs without a better validation score; cosine: from "
                       "--init_lr down to 0 along a half cosine over --epochs epochs, set once "
                       "per epoch, whatever the validation score")
    train.add_argument("--augment", type=_bool, default=False,
                       help="randomly crop (4 px of zero padding) and horizontally flip each "
                       "training image, drawn anew every epoch from --random_seed, the epoch and "
                       "the image; validation and test images never (cifar10 only: a flipped "
                       "digit is no digit)")
    train.add_argument("--random_seed", type=_int_between(0, MAX_SEED), default=1,
                       help="seed of every random stream")
    train.add_argument("--device", default="auto",
                       help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    train.add_argument("--amp", type=_bool, default=False,
                       help="bf16 autocast (for CUDA; on the CPU it runs but is rarely faster)")
    train.add_argument("--compile", type=_bool, default=False,
                       help="torch.compile the model (slow first epoch; needs a C++ compiler "
                       "on the CPU)")
    train.add_argument("--resume", type=_bool, default=False,
                       help="continue from the latest checkpoint of this model")


def _output_flags(p):
    out = p.add_argument_group("checkpoints and logs")
    out.add_argument("--ckpt_dir", default="./ckpt",
                     help="checkpoints go to <ckpt_dir>/<model name>/")
    out.add_argument("--ckpt_freq", type=positive_int, default=1,
                     help="keep the numbered checkpoint of every Nth epoch (best and latest are "
                     "always kept)")
    out.add_argument("--best", type=_bool, default=True,
                     help="with --is_train=false and no --model_epoch: test the best (true) or "
                     "the latest (false) checkpoint")
    out.add_argument("--model_epoch", type=_int_at_least(0), default=None,
                     help="with --is_train=false: test the checkpoint of this epoch; 0 tests the "
                     "untrained network, the initialisation --random_seed draws (no checkpoint "
                     "needed: the control for what training bought)")
    out.add_argument("--logs_dir", default="./logs", help="TensorBoard runs go here")
    out.add_argument("--use_tensorboard", type=_bool, default=False,
                     help="write TensorBoard scalars to <logs_dir>/<model name>/")
    out.add_argument("--plot_dir", default="./plots",
                     help="per-epoch glimpse data for plot_glimpses.py goes to "
                     "<plot_dir>/<model name>/")
    out.add_argument("--plot_freq", type=positive_int, default=1,
                     help="write glimpse data every Nth epoch")
    out.add_argument("--print_freq", type=positive_int, default=10,
                     help="refresh the progress bar's loss figures every Nth batch")


def build_parser():
    p = OneLineParser(prog="main.py", allow_abbrev=False,
                      description="Train or test the unsupervised recurrent attention model (RAM "
                      "with an autoencoder head) on CIFAR-10, or on RAM's MNIST benchmarks "
                      "(--dataset).")
    for add_group in (_glimpse_flags, _core_flags, _loss_flags, _data_flags, _training_flags,
                      _output_flags):
        add_group(p)
    return p


SCHEDULES = ("plateau", "cosine")  # --schedule: see trainer.make_scheduler
FEATURES = ("code", "glimpses", "states")  # --linear_eval_features: see trainer.encode


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run that is neither the model's nor the loss's: the data, the training,
    evaluation and the outputs. One field per flag of the same name, with the same default."""

    dataset: str = "cifar10"
    data_dir: str = "./data"
    canvas_size: int = 60
    distractors: int | None = None
    valid_size: float = 0.1
    batch_size: int = 128
    num_workers: int = 0
    is_train: bool = True
    epochs: int = 200
    init_lr: float = 3e-4
    policy_lr: float | None = None
    lr_patience: int = 20
    train_patience: int = 50
    schedule: str = "plateau"
    augment: bool = False
    random_seed: int = 1
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    resume: bool = False
    M: int = 10
    eval_chunk: int = 2048
    linear_eval: bool = True
    linear_eval_features: str = "code"
    ckpt_dir: str = "./ckpt"
    ckpt_freq: int = 1
    best: bool = True
    model_epoch: int | None = None
    logs_dir: str = "./logs"
    use_tensorboard: bool = False
    plot_dir: str = "./plots"
    plot_freq: int = 1
    print_freq: int = 10

    def __post_init__(self):
        if self.linear_eval_features not in FEATURES:
            raise ValueError(f"--linear_eval_features must be one of {', '.join(FEATURES)}, "
                             f"got {self.linear_eval_features!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {self.schedule!r}")
        if self.augment and self.dataset != "cifar10":
            raise ValueError(f"--augment=true is for --dataset=cifar10 only, not "
                             f"{self.dataset}: its horizontal flip turns a digit into no digit")


def ignored_flags(cfg: TrainConfig):
    """Warnings, one line each, for flags that this combination makes do nothing."""
    warnings = []
    if cfg.is_train and cfg.model_epoch is not None:
        warnings.append(f"--model_epoch={cfg.model_epoch} is ignored while training; it picks "
                        "the checkpoint that --is_train=false tests")
    if not cfg.is_train and cfg.resume:
        warnings.append("--resume=true is ignored with --is_train=false; testing reads the "
                        "checkpoint that --model_epoch or --best picks")
    if cfg.linear_eval_features != "code" and (cfg.is_train or not cfg.linear_eval):
        warnings.append(f"--linear_eval_features={cfg.linear_eval_features} is ignored without "
                        "--is_train=false --linear_eval=true; it chooses what the linear "
                        "evaluation reads")
    if cfg.dataset not in ("translated", "cluttered") and cfg.canvas_size != 60:
        warnings.append(f"--canvas_size={cfg.canvas_size} is ignored with --dataset="
                        f"{cfg.dataset}; it sizes the translated and cluttered canvases")
    if cfg.dataset != "cluttered" and cfg.distractors is not None:
        warnings.append(f"--distractors={cfg.distractors} is ignored with --dataset="
                        f"{cfg.dataset}; only cluttered canvases have distractors")
    if cfg.schedule == "cosine" and cfg.lr_patience != TrainConfig.lr_patience:
        warnings.append(f"--lr_patience={cfg.lr_patience} is ignored with --schedule=cosine; the "
                        "learning rate follows the cosine whatever the validation score")
    if cfg.is_train and cfg.schedule == "plateau" and cfg.lr_patience >= cfg.train_patience:
        warnings.append(f"--lr_patience={cfg.lr_patience} is not below --train_patience="
                        f"{cfg.train_patience}: training stops before the learning rate is cut")
    return warnings


def parse_args(argv=None):
    """Parse flags; unknown or misspelt flags are errors (exit 2, one line)."""
    return build_parser().parse_args(sys.argv[1:] if argv is None else argv)


def data_spec(args):
    """The DataSpec the data flags describe."""
    if args.dataset != "cluttered":
        distractors = 0
    else:
        distractors = args.distractors
        if distractors is None:
            distractors = 8 if args.canvas_size >= 100 else 4
    return DataSpec(args.dataset, args.canvas_size, distractors)


def image_facts(data):
    """The ModelConfig fields a dataset fixes: its tag, image shape, classes and pixel
    statistics."""
    return {"dataset": data.tag, "image_size": data.image_size,
            "num_channels": data.num_channels, "num_classes": data.num_classes,
            "pixel_mean": data.pixel_mean, "pixel_std": data.pixel_std}


def model_config(args, data=None, **overrides):
    """The ModelConfig the flags describe, on the images of `data` (a datasets.Data; None: the
    dataset's image shape alone, with mid-grey pixel statistics, for random-image benchmarks).
    Glimpse flags and --std left open take the dataset's defaults. Pure RAM (the supervised
    objective with --recon_weight=0) gets no decoder at all. A combination the config cannot be
    built with is a UserError."""
    chosen = {name: getattr(args, name) for name in (
        "patch_size", "glimpse_scale", "num_patches", "glimpse_hidden", "loc_hidden",
        "hidden_size", "num_glimpses", "std", "std_final", "learn_std", "policy_epochs",
        "policy", "objective", "reward", "baseline", "probe_input", "policy_input", "core",
        "glimpse_encoder", "write", "decoder_hidden", "location_grad", "contrast_dim",
        "temperature")}
    spec = data_spec(args)
    for name, value in spec.model_defaults().items():
        if chosen[name] is None:
            chosen[name] = value
    chosen["decoder"] = not (args.objective == "supervised" and args.recon_weight == 0)
    if data is not None:
        chosen.update(image_facts(data))
    elif spec.name != "cifar10":  # the shape alone, for benchmarks on random images
        channels, size = spec.image_shape
        chosen.update(dataset=spec.tag, image_size=size, num_channels=channels,
                      pixel_mean=(0.5,) * channels, pixel_std=(0.5,) * channels)
    try:
        return ModelConfig(**{**chosen, **overrides})
    except ValueError as e:
        raise UserError(str(e)) from None


def train_config(args):
    """The TrainConfig the flags describe; a combination it refuses is a UserError."""
    if args.augment and args.contrast_dim is not None:
        raise UserError("--augment and --contrast_dim both change the training images: "
                        "--contrast_dim's views are crops and flips already; leave --augment out")
    try:
        if args.policy_lr is not None:
            check_learns(args.policy, "policy_lr")
        return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    except ValueError as e:
        raise UserError(str(e)) from None


def loss_weights(args):
    """The LossWeights the flags give; an entropy bonus without a learned std, or a contrastive
    weight without the contrastive loss, is a UserError (it would move nothing)."""
    if args.entropy_weight > 0 and not args.learn_std:
        raise UserError("--entropy_weight rewards a learned std's spread: add "
                        "--learn_std=true, or leave --entropy_weight out")
    if args.contrast_weight != LossWeights.contrast_weight and args.contrast_dim is None:
        raise UserError("--contrast_weight weighs the contrastive loss: add --contrast_dim, "
                        "or leave --contrast_weight out")
    return LossWeights(recon_weight=args.recon_weight, classify_weight=args.classify_weight,
                       reinforce_weight=args.reinforce_weight,
                       baseline_weight=args.baseline_weight, entropy_weight=args.entropy_weight,
                       contrast_weight=args.contrast_weight)


def model_name(cfg: ModelConfig):
    """ram_[<dataset>_]<glimpses>_<g>x<g>_<scale> (the dataset's tag where it is not cifar10),
    then _k<patches>, _<objective>, _nodecoder (pure RAM), _<policy> and the reward,
    baseline, probe, policy-input, core and glimpse-encoder options, each where it is not the
    default, then _write<where>, _decoder<N>, _contrast<N> (and _temp<value>), _pathwise,
    _stdfinal<value>, _learnstd and _policyepochs<N> where those flags are given."""
    prefix = "ram" if cfg.dataset == ModelConfig.dataset else f"ram_{cfg.dataset}"
    name = f"{prefix}_{cfg.num_glimpses}_{cfg.patch_size}x{cfg.patch_size}_{cfg.glimpse_scale}"
    if cfg.num_patches != ModelConfig.num_patches:
        name += f"_k{cfg.num_patches}"
    if cfg.objective != ModelConfig.objective:
        name += f"_{cfg.objective}"
    if not cfg.decoder:
        name += "_nodecoder"
    if cfg.policy != ModelConfig.policy:
        name += f"_{cfg.policy}"
    # Ablations get folders of their own.
    for option in ("reward", "baseline", "probe_input", "policy_input", "core",
                   "glimpse_encoder"):
        if getattr(cfg, option) != getattr(ModelConfig, option):
            name += f"_{getattr(cfg, option)}"
    if cfg.write != ModelConfig.write:
        name += f"_write{cfg.write}"
    if cfg.decoder_hidden is not None:
        name += f"_decoder{cfg.decoder_hidden}"
    if cfg.contrast_dim is not None:
        name += f"_contrast{cfg.contrast_dim}"
        if cfg.temperature != ModelConfig.temperature:
            name += f"_temp{cfg.temperature:g}"
    if cfg.location_grad != ModelConfig.location_grad:
        name += f"_{cfg.location_grad}"
    if cfg.std_final is not None:
        name += f"_stdfinal{cfg.std_final:g}"
    if cfg.learn_std:
        name += "_learnstd"
    if cfg.policy_epochs is not None:
        name += f"_policyepochs{cfg.policy_epochs}"
    return name
