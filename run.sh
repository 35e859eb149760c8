#!/usr/bin/env bash
# Every setting of the papers' tables, one row (one command) each, and a runner that can be stopped and restarted
# through weeks of jobs.
#
#   bash run.sh [--list] [--dry-run] [--only REGEX] [--seeds "1 2 3"] [--gpus 0,1,...] [SUITE ...]
#
#   SUITE           selftuning | debiaspl | metric_transfer | usl (usl.py and usl_t.py) | metasemi | cpu (each method
#                   against its base in short CPU runs on digits, and on CIFAR-10 with CIFAR10_ROOT=DIR set); none:
#                   every method suite, not cpu (weeks of GPU time: read before running)
#   --list          print each row's run folder and command (variables expanded), run nothing
#   --dry-run       print what each row would do now (skip, resume or run), run nothing
#   --only REGEX    only the rows whose command line or run name matches REGEX (bash extended regex)
#   --seeds "1 2"   every row once per seed given, instead of its protocol's seeds
#   --gpus 0,1,...  queue the rows over these GPUs, one row per GPU at a time (CUDA_VISIBLE_DEVICES); a torchrun
#                   row takes --nproc_per_node of them. Without --gpus the rows run one after another.
#
# Each row writes to $RUNS/<run_name>/ (RUNS=runs unless set), and is idempotent: a row whose folder holds
# summary.json (or the product its --done names) is skipped, one whose folder holds a run (a checkpoint, or the files
# of a run cut off before its first checkpoint) continues with --resume auto, so a rerun continues where the last
# one stopped. A row that fails is recorded in $RUNS/run.sh.log
# (exit code, last error line) and the others go on; the exit status is then 1. A row's output is appended to
# $RUNS/<run_name>.log. A row that reads another row's folder waits for that row, and is not run if it failed.
# Ctrl-C or kill ends the running rows (a rerun resumes them); $RUNS/<run_name>.lock keeps a second run.sh off a
# folder that is being worked on.
# RUN_SH_VENV: the environment whose bin/ goes first in PATH (default .venv; empty: PATH as it is).
# Datasets are expected under the --root each command names; pass --download where the command has it.
set -euo pipefail
cd "$(dirname "$0")"
RUN_SH_VENV=${RUN_SH_VENV-.venv}
if [ -n "$RUN_SH_VENV" ] && [ -x "$RUN_SH_VENV/bin/python" ]; then PATH="$(cd "$RUN_SH_VENV" && pwd)/bin:$PATH"; fi
RUNS=${RUNS:-runs}
SEEDS=""

# Each suite queues its rows with `row COMMAND...`; every command names its --run_name, the runner adds
# --logdir $RUNS. `seeds DEFAULTS` gives the protocol's seeds unless --seeds overrides them. Rows named by the
# papers' settings (no seed in the name) keep that name for the paper's seed and get -s<seed> for other seeds.

selftuning() {
  # Self-Tuning (selftuning.py): every setting of the paper's tables (the reference's run.sh), plus the 100% label
  # column and the fine-tuning baseline of Table 1, run by the same script.
  # Fine-grained sets: ./CUB200, ./StanfordCars, ./Aircraft in the Self-Tuning layout (image_list/, train/, test/;
  # --download fetches the archives when the Tsinghua links are up). CIFAR-100: ./cifar100 (--download fetches it).
  # Shared by every run of the reference: ImageNet-pretrained backbone (torchvision IMAGENET1K_V1 weights, which
  # --pretrained fetches through the torch hub cache), K = 32 keys per class, 1024-d projector, lr 1e-3 (classifier
  # 1e-2), Nesterov SGD, wd 1e-4, 27005 iterations with the lr divided by 10 at 6k/12k/18k/24k, seed 666666.
  SELFTUNING="--queue_size 32 --projector_dim 1024 --pretrained"

  for seed in $(seeds 666666); do
    # Table 1, ResNet-50, batch 24: FGVC Aircraft, Stanford Cars, CUB-200-2011 at 15 / 30 / 50 % labels.
    for DATA in Aircraft StanfordCars CUB200; do
      for RATIO in 15 30 50; do
        row python selftuning.py --root ./$DATA --label_ratio $RATIO --backbone resnet50 --batch_size 24 $SELFTUNING \
          --seed $seed --run_name selftuning-${DATA,,}-${RATIO}pct-s$seed
      done
    done
    # Table 1, 100 % labels (not in the reference's run.sh, and its code crashes on the empty unlabeled set): the PGC
    # term on the labeled batch only.
    for DATA in Aircraft StanfordCars CUB200; do
      row python selftuning.py --root ./$DATA --label_ratio 100 --backbone resnet50 --batch_size 24 $SELFTUNING \
        --seed $seed --run_name selftuning-${DATA,,}-100pct-s$seed
    done
    # Table 1's fine-tuning baseline, by the same pipeline (CE on the labeled batch only); the paper's FT row was not
    # produced by the released code (reference issue #6), so run it rather than quote it.
    for DATA in Aircraft StanfordCars CUB200; do
      for RATIO in 15 30 50 100; do
        row python selftuning.py --root ./$DATA --label_ratio $RATIO --backbone resnet50 --batch_size 24 $SELFTUNING \
          --no-pgc --seed $seed --run_name selftuning-ft-${DATA,,}-${RATIO}pct-s$seed
      done
    done

    # Table 2, CIFAR-100 with EfficientNet-B2, batch 20, 400 / 2500 / 10000 labels; 32 -> 224 upsampling. The
    # reference always loads lukemelas' TF-ported B2 weights; --pretrained here loads torchvision's B2 (other weights).
    # --resize_interp: bicubic is modern Pillow's default; nearest is what the reference's pinned Pillow < 7 did.
    for N in 400 2500 10000; do
      row python selftuning.py --root ./cifar100 --num_labeled $N --expand_label --backbone efficientnet_b2 \
        --batch_size 20 $SELFTUNING --resize_interp bicubic --seed $seed --run_name selftuning-cifar100-$N-s$seed
    done
  done

  # The same on N GPUs: --batch_size stays the global batch.
  # torchrun --nproc_per_node 4 selftuning.py --root ./CUB200 --label_ratio 15 --batch_size 24 $SELFTUNING --amp bf16
}

debiaspl() {
  # DebiasPL (debiaspl.py): every setting of the reference's scripts/ plus CIFAR-10 with 40 and 250 labels.
  # ImageNet: imagenet/{train,val}/<wnid>/*.JPEG and imagenet/indexes/*.csv (index files and CLIP files from the
  # reference's Google Drive folders); MoCo-EMAN weights from
  # https://eman-cvpr.s3.amazonaws.com/models/res50_moco_eman_800ep.pth.tar in pretrained/.
  # Shared by the five ImageNet scripts of the reference: ResNet-50 from MoCo-EMAN, EMAN teacher, lr 0.003 with 5
  # warmup epochs then cosine per epoch, tau 0.4, CLD, two weak + two strong views; batch 64 labeled + 320 unlabeled
  # (global), lambda_u 10, wd 1e-4, EMA 0.999. --dali moves decoding and augmentation to the GPUs (its strong view is
  # DALI's RandAugment, not the reference's; drop --dali for the hand-written one). One run each, seed 0.
  DEBIASPL_IMAGENET="--root imagenet --backbone resnet50 --pretrained pretrained/res50_moco_eman_800ep.pth.tar --eman
    --lr 0.003 --cos --warmup_epoch 5 --tau 0.4 --CLDLoss --multiviews --batch_size 64 --mu 5 --amp bf16 --dali"

  for seed in $(seeds 0); do
    s=$(suffix $seed 0)
    # ImageNet 0.2% (scripts/0.2perc-ssl/train_DebiasPL.sh; it names the labeled file train0.2p_index.csv, the CLIP
    # script train_0.2p_index.csv: use the name of the file you downloaded)
    row torchrun --nproc_per_node 8 debiaspl.py $DEBIASPL_IMAGENET --trainindex_x train_0.2p_index.csv \
      --trainindex_u train_99.8p_index.csv --epochs 50 --threshold 0.8 --qhat_m 0.99 --lambda_cld 0.1 \
      --seed $seed --run_name debiaspl-imagenet-0.2p$s
    # ImageNet 0.2% with CLIP (scripts/0.2perc-ssl/train_DebiasPL_w_CLIP.sh; needs
    # imagenet/indexes/train_99.8p_index_clip_predictions_ranked.pth.tar); the README's 100-epoch 70.4% has no script
    row torchrun --nproc_per_node 8 debiaspl.py $DEBIASPL_IMAGENET --trainindex_x train_0.2p_index.csv \
      --trainindex_u train_99.8p_index.csv --epochs 50 --threshold 0.7 --qhat_m 0.99 --lambda_cld 0.1 --use_clip \
      --seed $seed --run_name debiaspl-imagenet-0.2p-clip$s
    # ImageNet 1% (scripts/1perc-ssl/train_DebiasPL.sh)
    row torchrun --nproc_per_node 8 debiaspl.py $DEBIASPL_IMAGENET --trainindex_x train_1p_index.csv \
      --trainindex_u train_99p_index.csv --epochs 50 --threshold 0.8 --qhat_m 0.999 --lambda_cld 0.3 \
      --seed $seed --run_name debiaspl-imagenet-1p$s
    # ImageNet 1% with CLIP, 100 epochs (scripts/1perc-ssl/train_DebiasPL_w_CLIP.sh)
    row torchrun --nproc_per_node 8 debiaspl.py $DEBIASPL_IMAGENET --trainindex_x train_1p_index.csv \
      --trainindex_u train_99p_index.csv --epochs 100 --threshold 0.7 --qhat_m 0.99 --lambda_cld 0.3 --use_clip \
      --seed $seed --run_name debiaspl-imagenet-1p-clip$s
    # ImageNet zero-shot (scripts/zsl/train_DebiasPL_ImageNet.sh, 2 GPUs in the reference, same global batch): labels
    # are CLIP's PseudoLabel column, never the folder's (the reference trained on the ground truth by mistake)
    row torchrun --nproc_per_node 2 debiaspl.py $DEBIASPL_IMAGENET --zero_shot --trainindex_x CLIPPseudoLabel0.95.csv \
      --trainindex_u CLIPPseudoLabel0.95-Unselected.csv --epochs 50 --threshold 0.8 --qhat_m 0.99 --lambda_cld 0.3 \
      --seed $seed --run_name debiaspl-imagenet-zsl$s
  done

  # CIFAR-10, 40 and 250 labels, three label splits each (the FixMatch protocol: WRN-28-2 from scratch, 2^20
  # iterations with the cos(7 pi k / 16 K) decay; DebiasPL tau 0.4, q momentum 0.999; the student labels its own
  # weak views, as FixMatch). One GPU each.
  for labels in 40 250; do
    for seed in $(seeds 0 1 2); do
      row python debiaspl.py --root data/cifar10 --dataset cifar10 --download --num_labeled $labels --seed $seed \
        --backbone wrn28_2 --batch_size 64 --mu 7 --lr 0.03 --nesterov --weight_decay 5e-4 --threshold 0.95 \
        --lambda_u 1 --epochs 1024 --epoch_iters 1024 --tau 0.4 --qhat_m 0.999 --workers 4 \
        --run_name debiaspl-cifar10-$labels-s$seed
    done
  done
}

metric_transfer() {
  # Deep Metric Transfer (metric_transfer.py): the README table of the reference (CIFAR-10, WRN-28-2, 50 to 8000 labels)
  # and ImageNet 1% (13,000 labels, ResNet-50). Stage A is trained once and shared by every label count; each label
  # count gets its own run folder (seeds, pseudo-labels, fine-tuning). The stages of one folder are rows of their
  # own, each done when its product is there (--done). One run, seed 0 (the split's seed).
  for seed in $(seeds 0); do
    s=$(suffix $seed 0)
    # CIFAR-10 stage A (scripts/instance_cifar10.sh): instance discrimination, exact softmax over the 50,000-entry
    # memory bank (--nce_k 0), t 0.1, momentum 0.5, lr 0.03, SGDR T0=10 Tmult=2 over 1270 epochs (seven full cycles,
    # ending at the minimum), batch 128, wd 5e-4.
    row --done pretrain.pt python metric_transfer.py --stage pretrain --root data/cifar10 --download \
      --backbone wrn28_2 --pretrain_scheduler cosine-with-restart --epochs 1270 --seed $seed \
      --run_name mt-cifar10-pretrain$s

    # CIFAR-10 stages B and C for every label count of the README table. The reference does not say which
    # propagation or pseudo_ratio each entry used (its one fine-tuning script: 250 labels, normalised-cut labels,
    # ratio 0.2); spectral and 0.2 throughout. Fine-tuning: lr 0.01 nesterov, wd 5e-4, cosine per iteration over
    # 500,000 iterations, batch 128, test every 500 iterations (summary.json: final_top1 and best_top1, the latter
    # what the README reports).
    for n in 50 100 250 500 1000 2000 4000 8000; do
      row --done propagation_spectral.json python metric_transfer.py --stage propagate --root data/cifar10 \
        --num_labeled $n --propagation spectral --metric_net "$RUNS/mt-cifar10-pretrain$s/pretrain.pt" \
        --seed $seed --run_name mt-cifar10-$n$s
      row --done summary.json:final_top1 python metric_transfer.py --stage finetune --root data/cifar10 \
        --num_labeled $n --propagation spectral --pseudo_ratio 0.2 --max_iter 500000 \
        --metric_net "$RUNS/mt-cifar10-pretrain$s/pretrain.pt" --seed $seed --run_name mt-cifar10-$n$s --resume auto
    done
    # The kNN propagation rows of the notebooks (pseudo-label accuracy only): add to the same folders
    for n in 50 100 250 500 1000 2000 4000 8000; do
      row --done propagation_knn.json python metric_transfer.py --stage propagate --root data/cifar10 \
        --num_labeled $n --propagation knn --metric_net "$RUNS/mt-cifar10-pretrain$s/pretrain.pt" \
        --seed $seed --run_name mt-cifar10-$n$s --resume auto
    done

    # ImageNet 1% (scripts/finetune_imagenet.sh with (13000, 0.1)): stage A is lemniscate's ResNet-50 (128-d head;
    # https://frontiers.blob.core.windows.net/pretraining/checkpoints/pil_pretrained_models/lemniscate/lemniscate_resnet50.pth
    # or the reference's pretrain_models/lemniscate_resnet50.pth.tar; both pickle a memory-bank object, hence
    # --trust_checkpoint). One global graph over all 1,281,167 images (the reference cut the class-ordered unlabeled
    # set into 10 chunks, which leaks the class structure: expect lower pseudo-label accuracy than its released files).
    row --done propagation_spectral.json torchrun --nproc_per_node 4 metric_transfer.py --stage propagate \
      --root imagenet --backbone resnet50 --metric_net pretrained/lemniscate_resnet50.pth.tar --trust_checkpoint \
      --num_labeled 13000 --propagation spectral --seed $seed --run_name mt-imagenet-1p$s
    # Fine-tuning: lr 0.01 nesterov, wd 0, batch 256, 50,000 iterations, x0.1 at 21,428 and 42,857, RandomResizedCrop
    # 224.
    row --done summary.json:final_top1 torchrun --nproc_per_node 4 metric_transfer.py --stage finetune \
      --root imagenet --backbone resnet50 --metric_net pretrained/lemniscate_resnet50.pth.tar --trust_checkpoint \
      --num_labeled 13000 --propagation spectral --pseudo_ratio 0.1 --batch_size 256 --max_iter 50000 --amp bf16 \
      --dali --seed $seed --run_name mt-imagenet-1p$s --resume auto
  done
  # The reference's released ImageNet pseudo-labels (pseudos_imagenet/.../num_labeled_13000, ten chunk files) instead:
  #   ... --stage finetune --pseudo_file pseudos_imagenet/instance_imagenet_nc_resnet50/num_labeled_13000 ...
  # Stage A on ImageNet from scratch (lemniscate: NCE K=4096, t 0.07, 200 epochs, lr 0.03 x0.1 at 120 and 160, wd 1e-4):
  #   torchrun --nproc_per_node 8 metric_transfer.py --stage pretrain --root imagenet --backbone resnet50 \
  #     --nce_k 4096 --nce_t 0.07 --epochs 200 --pretrain_scheduler multi-step --pretrain_wd 1e-4 --batch_size 256 \
  #     --amp bf16 --dali --run_name mt-imagenet-pretrain
}

usl() {
  # USL (usl.py) and USL-T (usl_t.py): every setting of the reference's configs, each followed by the
  # semi-supervised run that trains on its selection (FixMatch = debiaspl.py with --tau 0; the paper's protocol).
  # Checkpoints (USL README, put them in pretrained/):
  #   CLD CIFAR-10/100:  https://people.eecs.berkeley.edu/~longlian/files/cifar10_ckpt_epoch_200.pth, cifar100_...
  #   MoCo-v2-EMAN:      https://eman-cvpr.s3.amazonaws.com/models/res50_moco_eman_800ep.pth.tar
  #   USL-T pretext:     https://people.eecs.berkeley.edu/~longlian/files/pretrained_kNN_{cifar10,cifar100,imagenet}.tgz
  #                      (model.pth.tar + topk-train-neighbors.npy, extracted to pretrained/kNN_<dataset>/)
  # CLD checkpoints pickle an argparse.Namespace: --trust_checkpoint loads them (only for files you trust).
  # The seed of a pair is the selection's (it names both runs); FixMatch trains with its own default seed on each.
  FIXMATCH_CIFAR="--backbone wrn28_2 --batch_size 64 --mu 7 --lr 0.03 --nesterov --weight_decay 5e-4 --threshold 0.95
    --lambda_u 1 --epochs 1024 --epoch_iters 1024 --tau 0 --workers 4"

  # --- USL, CIFAR-10: 40, 100, 250 labels, k-means seeds 1..5 (configs/cifar10_usl.yaml; the intermediates are shared
  # through --cache_dir, so features and the kNN are computed once)
  for budget in 40 100 250; do
    for seed in $(seeds 1 2 3 4 5); do
      row python usl.py --root data/cifar10 --dataset cifar10 --download \
        --pretrained pretrained/cifar10_ckpt_epoch_200.pth --trust_checkpoint --budget $budget --seed $seed \
        --cache_dir "$RUNS/usl-cifar10-cache" --run_name usl-cifar10-$budget-s$seed
      row python debiaspl.py --root data/cifar10 --dataset cifar10 $FIXMATCH_CIFAR \
        --trainindex_x "$RUNS/usl-cifar10-$budget-s$seed/selected.csv" --run_name fixmatch-usl-cifar10-$budget-s$seed
    done
  done
  # the random baseline of the README (seeds 1, 2, 5 give its published lists)
  for seed in $(seeds 1 2 5); do
    row python usl.py --root data/cifar10 --dataset cifar10 --selection random --budget 40 --seed $seed \
      --run_name usl-cifar10-40-random-s$seed
    row python debiaspl.py --root data/cifar10 --dataset cifar10 $FIXMATCH_CIFAR \
      --trainindex_x "$RUNS/usl-cifar10-40-random-s$seed/selected.csv" --run_name fixmatch-random-cifar10-40-s$seed
  done

  # --- USL, CIFAR-100: 400 labels (configs/cifar100_usl.yaml: lambda 1, alpha 1, horizon 1; WRN-28-8, wd 1e-3)
  for seed in $(seeds 1 2 3 4 5); do
    row python usl.py --root data/cifar100 --dataset cifar100 --download \
      --pretrained pretrained/cifar100_ckpt_epoch_200.pth --trust_checkpoint --budget 400 --seed $seed \
      --cache_dir "$RUNS/usl-cifar100-cache" --run_name usl-cifar100-400-s$seed
    row python debiaspl.py --root data/cifar100 --dataset cifar100 $FIXMATCH_CIFAR --backbone wrn28_8 \
      --weight_decay 1e-3 --trainindex_x "$RUNS/usl-cifar100-400-s$seed/selected.csv" \
      --run_name fixmatch-usl-cifar100-400-s$seed
  done

  # --- USL, ImageNet 0.2% (2,911 labels), seed 0: USL-MoCo (configs/ImageNet_usl_moco_0.2.yaml) and USL-CLIP
  # (ImageNet_usl_clip_0.2.yaml: CLIP ViT-B/16 features computed elsewhere, one row per image in ImageFolder order).
  # Dropping the authors' intermediates (memory_feats_list.npy, d_knns.npy, cluster_labels_2911_0.npy) into the run
  # folder reuses them, which is how the README reproduces the released selection.
  for seed in $(seeds 0); do
    s=$(suffix $seed 0)
    row torchrun --nproc_per_node 8 usl.py --root imagenet --dataset imagenet --backbone resnet50 \
      --pretrained pretrained/res50_moco_eman_800ep.pth.tar --budget 2911 --seed $seed --dali \
      --run_name usl-imagenet-moco-0.2p$s
    row python usl.py --root imagenet --dataset imagenet --features clip_vitb16_feats.npy --budget 2911 --seed $seed \
      --reg_lambda 0.05 --reg_alpha 1.0 --reg_horizon_num 32 --reg_exclude_same_cluster \
      --run_name usl-imagenet-clip-0.2p$s
    # FixMatch with an EMAN teacher from MoCo-EMAN (the paper's ImageNet protocol), on each selection
    for sel in moco clip; do
      row torchrun --nproc_per_node 8 debiaspl.py --root imagenet --backbone resnet50 \
        --pretrained pretrained/res50_moco_eman_800ep.pth.tar --eman --lr 0.003 --cos --warmup_epoch 5 --epochs 50 \
        --threshold 0.7 --tau 0 --batch_size 64 --mu 5 --amp bf16 --dali \
        --trainindex_x "$RUNS/usl-imagenet-$sel-0.2p$s/selected.csv" \
        --trainindex_u "$RUNS/usl-imagenet-$sel-0.2p$s/unselected.csv" --run_name fixmatch-usl-$sel-imagenet-0.2p$s
    done
  done

  for seed in $(seeds 42); do
    s=$(suffix $seed 42)
    # --- USL-T, CIFAR-10 40 / 100 / 250 and CIFAR-100 400 (usl-t_pretraining/configs: 200 epochs, batch 1024, Adam
    # 1e-4), seed 42
    for budget in 40 100 250; do
      row torchrun --nproc_per_node 4 usl_t.py --root data/cifar10 --dataset cifar10 \
        --pretrained pretrained/kNN_cifar10/model.pth.tar --neighbors pretrained/kNN_cifar10/topk-train-neighbors.npy \
        --budget $budget --seed $seed --run_name usl_t-cifar10-$budget-s$seed
      row python debiaspl.py --root data/cifar10 --dataset cifar10 $FIXMATCH_CIFAR \
        --trainindex_x "$RUNS/usl_t-cifar10-$budget-s$seed/selected.csv" --run_name fixmatch-uslt-cifar10-$budget$s
    done
    row torchrun --nproc_per_node 4 usl_t.py --root data/cifar100 --dataset cifar100 \
      --pretrained pretrained/kNN_cifar100/model.pth.tar --neighbors pretrained/kNN_cifar100/topk-train-neighbors.npy \
      --budget 400 --seed $seed --run_name usl_t-cifar100-400-s$seed
    row python debiaspl.py --root data/cifar100 --dataset cifar100 $FIXMATCH_CIFAR --backbone wrn28_8 \
      --weight_decay 1e-3 --trainindex_x "$RUNS/usl_t-cifar100-400-s$seed/selected.csv" \
      --run_name fixmatch-uslt-cifar100-400$s

    # --- USL-T, ImageNet 0.2%: 3000 clusters, heads only, 10 epochs, batch 2048 (ImageNet_usl-t_pretrain.yaml); the
    # densest image of the 2,911 largest clusters is labelled (selected.csv); pseudo_labels.csv spreads each label to
    # the cluster's 20 densest images (the reference's downstream SimCLRv2 fine-tuning trains on those)
    row torchrun --nproc_per_node 8 usl_t.py --root imagenet --dataset imagenet \
      --pretrained pretrained/kNN_imagenet/model.pth.tar --neighbors pretrained/kNN_imagenet/topk-train-neighbors.npy \
      --budget 2911 --workers 16 --seed $seed --run_name usl_t-imagenet-2911-s$seed
    row torchrun --nproc_per_node 8 debiaspl.py --root imagenet --backbone resnet50 \
      --pretrained pretrained/res50_moco_eman_800ep.pth.tar --eman --lr 0.003 --cos --warmup_epoch 5 --epochs 50 \
      --threshold 0.7 --tau 0 --batch_size 64 --mu 5 --amp bf16 --dali \
      --trainindex_x "$RUNS/usl_t-imagenet-2911-s$seed/selected.csv" \
      --trainindex_u "$RUNS/usl_t-imagenet-2911-s$seed/unselected.csv" --run_name fixmatch-uslt-imagenet-0.2p$s
  done
}

metasemi() {
  # MetaSemi (metasemi.py): the four settings of the paper (README and run.sh history of Sakura03/SemiMeta).
  # CIFAR/SVHN: one GPU, ConvLarge, mixup, 400k iterations (lr 0.1, warmup and consistency ramp-up 4000, x0.1 at
  # 300k and 350k), batch 128 labeled + 128 unlabeled, epsilon 0.01; --download fetches the data into --root.
  # These are the defaults, spelled out so the line reads as the recipe. One seed per dataset, the paper's.
  METASEMI_SMALL="--backbone convlarge --mix_up --max_iter 400000 --milestones 300000 350000 --lr 0.1 --warmup 4000
    --weight 1.0 --batch_size 128 --epsilon 0.01 --meta_grad fd"

  # SVHN-1000 (train split only, not extra; no horizontal flip): paper 3.15 % error
  for seed in $(seeds 7788); do
    row python metasemi.py --root data/svhn --dataset svhn --download --num_labeled 1000 $METASEMI_SMALL --alpha 0.1 \
      --seed $seed --weight_decay 5e-5 --run_name metasemi-svhn-1000-s$seed
  done
  # CIFAR-10-4000: paper 7.78 % error
  for seed in $(seeds 8469); do
    row python metasemi.py --root data/cifar10 --dataset cifar10 --download --num_labeled 4000 $METASEMI_SMALL \
      --alpha 1.0 --seed $seed --weight_decay 1e-4 --run_name metasemi-cifar10-4000-s$seed
  done
  # CIFAR-100-10000: paper 30.74 % error
  for seed in $(seeds 7788); do
    row python metasemi.py --root data/cifar100 --dataset cifar100 --download --num_labeled 10000 $METASEMI_SMALL \
      --alpha 1.0 --seed $seed --weight_decay 1e-4 --run_name metasemi-cifar100-10000-s$seed
  done

  # ImageNet 10 %, ResNet-18, 8 GPUs x (64 labeled + 64 unlabeled), DALI, 600 unlabeled epochs, cosine with 5 warmup
  # epochs: paper 44.87 % top-1 / 18.88 % top-5 error. The reference's split files are not public: either pack your
  # own split as RecordIO (imagenet_rec/{train_label,train_unlabel,val}.rec/.idx, e.g.
  #   python -m common.dali pack imagenet/labeled imagenet_rec/train_label --classes_from imagenet/train
  #   python -m common.dali pack imagenet/unlabeled imagenet_rec/train_unlabel --classes_from imagenet/train
  #   python -m common.dali pack imagenet/val imagenet_rec/val --classes_from imagenet/train )
  for seed in $(seeds 1234); do
    row torchrun --nproc_per_node 8 metasemi.py --root imagenet_rec --dataset imagenet --backbone resnet18 --dali \
      --batch_size 512 --lr 0.1 --weight_decay 1e-4 --epochs 600 --warmup 5 --alpha 1.0 --epsilon 0.01 --seed $seed \
      --run_name metasemi-imagenet-10p-rec-s$seed
    # or draw a class-balanced 10 % split (128 per class = 128,000 images) from the seed out of imagenet/train
    row torchrun --nproc_per_node 8 metasemi.py --root imagenet --dataset imagenet --num_labeled 128000 \
      --backbone resnet18 --dali --batch_size 512 --lr 0.1 --weight_decay 1e-4 --epochs 600 --warmup 5 --alpha 1.0 \
      --epsilon 0.01 --seed $seed --run_name metasemi-imagenet-128000-s$seed
  done

  # Ablation of the paper (slides p.18) on CIFAR-10-4000: the meta step without mixup (paper 11.63 %), and mixup with
  # the eval-mode predictions as soft targets, no meta step and no consistency term (train_baseline.py --mix-up,
  # paper 11.10 %)
  for seed in $(seeds 8469); do
    s=$(suffix $seed 8469)
    row python metasemi.py --root data/cifar10 --dataset cifar10 --num_labeled 4000 $METASEMI_SMALL --no-mix_up \
      --seed $seed --run_name metasemi-cifar10-4000-nomixup$s
    row python metasemi.py --root data/cifar10 --dataset cifar10 --num_labeled 4000 $METASEMI_SMALL --no-meta --weight 0 \
      --alpha 1.0 --seed $seed --run_name metasemi-cifar10-4000-nometa$s
    # The exact meta-gradient instead of the finite difference (same recipe)
    row python metasemi.py --root data/cifar10 --dataset cifar10 --num_labeled 4000 $METASEMI_SMALL --alpha 1.0 \
      --seed $seed --meta_grad jvp --run_name metasemi-cifar10-4000-jvp$s
  done
}

cpu() {
  # Each method against its own base on real images, on CPU, seeds 0 1 2: scikit-learn's embedded handwritten digits
  # (1,497 train / 300 test images, no download; about an hour on 2 cores), and CIFAR-10 as well when CIFAR10_ROOT
  # names a folder in the torchvision format (ROOT/cifar-10-batches-py/; 4 to 5 more hours). The scripts read
  # CIFAR-10 only in that format: an image folder would be `imagefolder`, which switches them to their ImageNet
  # recipes. Every recipe is cut to minutes per row (hundreds of iterations where the papers run 10^5 to 10^6), so
  # the tables say whether a method beats its base at this length, not what the papers report. ResNet-18 at 32 px
  # throughout, the cheapest backbone on a CPU.
  # Labeled data alone: debiaspl.py --lambda_u 0 leaves loss = CE(labeled), but the unlabeled strong views still
  # share the student's BatchNorm batch; metasemi.py --no-meta --no-mix_up --weight 0 leaves CE(labeled) + 0 x
  # consistency, whose unlabeled forward still moves the BN running statistics. Neither has a labeled-only mode.
  # Run names start with cpu-, apart from the paper suites' runs of the same data.
  local D DATA L COUNTS N_FT B DPL MS MSL PRE_EP PRE ST FT USLT seed n sel
  for D in digits ${CIFAR10_ROOT:+cifar10}; do
    if [ "$D" = digits ]; then
      DATA="--root digits --dataset digits" L=50 COUNTS="10 20 50 100" N_FT=20 B=10
      DPL="--epochs 6 --epoch_iters 50" PRE_EP="--epochs 60" ST="--max_iter 300 --eval_interval 100"
      FT="--max_iter 200 --eval_interval 100" USLT="--max_iter 150"
      MSL="--max_iter 300 --warmup 30 --milestones 225 270 --eval_interval 100"
    else
      DATA="--root $CIFAR10_ROOT --dataset cifar10" L=250 COUNTS="40 250 1000" N_FT=250 B=40
      DPL="--epochs 5 --epoch_iters 200" PRE_EP="--epochs 4" ST="--max_iter 1000 --eval_interval 250"
      FT="--max_iter 1000 --eval_interval 250" USLT="--max_iter 300"
      MSL="--max_iter 1000 --warmup 100 --milestones 750 900 --eval_interval 250"
    fi
    # FixMatch family: 300 iterations on digits (the README's demo), 1000 on CIFAR-10, instead of 2^20. EMAN teacher
    # and class-marginal momenta 0.99, not 0.999: at 0.999 the teacher of a run this short would still be mostly its
    # random initialisation, and DebiasPL's q would hardly leave its uniform start.
    DPL="$DATA --backbone resnet18 --batch_size 16 --mu 2 --lr 0.01 $DPL --eman --ema_m 0.99 --qhat_m 0.99
      --workers 0 --device cpu"

    # DebiasPL (tau 0.4, its CIFAR default) vs its base FixMatch-EMAN (tau 0) vs the labeled images alone
    # (lambda_u 0): same split, iterations and teacher; the student's top-1 is reported (teacher_final_top1 too).
    for seed in $(seeds 0 1 2); do
      row python debiaspl.py $DPL --num_labeled $L --seed $seed --run_name cpu-debiaspl-$D-$L-s$seed
      row python debiaspl.py $DPL --num_labeled $L --tau 0 --seed $seed --run_name cpu-fixmatch-$D-$L-s$seed
      row python debiaspl.py $DPL --num_labeled $L --lambda_u 0 --seed $seed \
        --run_name cpu-debiaspl-labeled-only-$D-$L-s$seed
    done

    # MetaSemi (mixup, meta-gradient pseudo-labels) vs --no-meta (the same without the meta step) vs the labeled
    # images alone: 300 (digits) or 1000 (CIFAR-10) iterations of 32 labeled + 32 unlabeled instead of 400k of
    # 128 + 128, ResNet-18 instead of ConvLarge, lr 0.03, warmup and consistency ramp-up a tenth of the run.
    MS="$DATA --num_labeled $L --backbone resnet18 --mix_up --batch_size 32 --lr 0.03 $MSL --workers 0 --device cpu"
    for seed in $(seeds 0 1 2); do
      row python metasemi.py $MS --seed $seed --run_name cpu-metasemi-$D-$L-s$seed
      row python metasemi.py $MS --no-meta --seed $seed --run_name cpu-metasemi-nometa-$D-$L-s$seed
      row python metasemi.py $MS --no-meta --no-mix_up --weight 0 --seed $seed \
        --run_name cpu-metasemi-labeled-only-$D-$L-s$seed
    done

    # The backbone of every row below, made without labels: instance discrimination (metric_transfer.py stage A) on
    # the training images, one cosine cycle of 60 epochs (digits) or 4 (CIFAR-10) instead of 1270 SGDR epochs. One
    # backbone for all seeds, as the paper's stage A, so the seeds of a row differ in split and training only.
    row --done pretrain.pt python metric_transfer.py --stage pretrain $DATA --backbone resnet18 \
      --pretrain_scheduler cosine $PRE_EP --workers 0 --device cpu --seed 0 --run_name cpu-mt-$D-pretrain
    PRE=$RUNS/cpu-mt-$D-pretrain

    # Self-Tuning vs fine-tuning (--no-pgc: CE on the labeled batch, no unlabeled data), both from that backbone:
    # 300 (digits) / 1000 (CIFAR-10) iterations instead of 27k, constant lr 1e-3 (the decays start at 6k). They
    # read the stage's checkpoint.pt, which holds the same final weights as its pretrain.pt.
    ST="$DATA --num_labeled $L --backbone resnet18 --image_size 32 --pretrained $PRE/checkpoint.pt --batch_size 16 $ST
      --workers 0 --device cpu"
    for seed in $(seeds 0 1 2); do
      row python selftuning.py $ST --seed $seed --run_name cpu-selftuning-$D-$L-s$seed
      row python selftuning.py $ST --no-pgc --seed $seed --run_name cpu-selftuning-ft-$D-$L-s$seed
    done

    # Deep Metric Transfer: pseudo-label accuracy of spectral and kNN propagation at several seed counts
    # (propagation_{spectral,knn}.json), then at one count fine-tuning on the seeds + the 20% most confident
    # spectral labels vs on the seeds alone, same pipeline (--pseudo_ratio 1e-6 keeps floor(1e-6 N_u) = 0
    # pseudo-labels; the script has no seeds-only switch). Fine-tuning: batch 64, 200 (digits) / 1000 (CIFAR-10)
    # iterations instead of 500k.
    FT="$DATA --backbone resnet18 --num_labeled $N_FT --batch_size 64 $FT --metric_net $PRE/pretrain.pt --workers 0
      --device cpu"
    for seed in $(seeds 0 1 2); do
      for n in $COUNTS; do
        row --done propagation_spectral.json python metric_transfer.py --stage propagate $DATA --backbone resnet18 \
          --num_labeled $n --propagation spectral --metric_net "$PRE/pretrain.pt" --workers 0 --device cpu \
          --seed $seed --run_name cpu-mt-$D-$n-s$seed
        row --done propagation_knn.json python metric_transfer.py --stage propagate $DATA --backbone resnet18 \
          --num_labeled $n --propagation knn --metric_net "$PRE/pretrain.pt" --workers 0 --device cpu \
          --seed $seed --run_name cpu-mt-$D-$n-s$seed --resume auto
      done
      row --done summary.json:final_top1 python metric_transfer.py --stage finetune $FT --propagation spectral \
        --pseudo_ratio 0.2 --seed $seed --run_name cpu-mt-$D-$N_FT-s$seed --resume auto
      row --done propagation_knn.json python metric_transfer.py --stage propagate $DATA --backbone resnet18 \
        --num_labeled $N_FT --propagation knn --metric_net "$PRE/pretrain.pt" --workers 0 --device cpu \
        --seed $seed --run_name cpu-mt-seeds-only-$D-$N_FT-s$seed
      row --done summary.json:final_top1 python metric_transfer.py --stage finetune $FT --propagation knn \
        --pseudo_ratio 1e-6 --seed $seed --run_name cpu-mt-seeds-only-$D-$N_FT-s$seed --resume auto
    done

    # USL and USL-T vs random selection of the same budget (1 label per class on digits, 4 on CIFAR-10): class
    # coverage in each selection's summary.json, and FixMatch-EMAN (the recipe above, --tau 0) trained on each.
    # Features from the backbone above (its checkpoint.pt, as Self-Tuning); USL-T trains
    # 150 / 300 steps of batch 128 instead of 200 epochs of 1024, on neighbours it mines from those features.
    for seed in $(seeds 0 1 2); do
      row python usl.py $DATA --backbone resnet18 --pretrained "$PRE/checkpoint.pt" --budget $B --workers 0 \
        --device cpu --seed $seed --run_name cpu-usl-$D-$B-s$seed
      row python usl_t.py $DATA --backbone resnet18 --pretrained "$PRE/checkpoint.pt" --budget $B --batch_size 128 \
        $USLT --workers 0 --device cpu --seed $seed --run_name cpu-usl_t-$D-$B-s$seed
      row python usl.py $DATA --selection random --budget $B --workers 0 --device cpu --seed $seed \
        --run_name cpu-usl-$D-$B-random-s$seed
      for sel in usl-$D-$B usl_t-$D-$B usl-$D-$B-random; do
        row python debiaspl.py $DPL --tau 0 --trainindex_x "$RUNS/cpu-$sel-s$seed/selected.csv" --seed $seed \
          --run_name cpu-fixmatch-$sel-s$seed
      done
    done
  done
}

# -------------------------------------------------------------------------------------------------------------- rows
ROW_CMD=() ROW_NAME=() ROW_DONE=() ROW_NPROC=() ROW_DEPS=()
declare -A LAST_ROW=()  # run name -> the last row queued so far that writes that folder

row() {  # [--done FILE[:KEY]] COMMAND...: queue a row; it is done when FILE (default summary.json) is in its run
  # folder and, with :KEY, FILE holds a non-null "KEY". It waits for the earlier rows of its own folder and of every
  # $RUNS/<folder>/ it reads.
  local done=summary.json name="" nproc=1 prev="" w ref deps="" n=${#ROW_NAME[@]}
  if [ "$1" = --done ]; then done=$2; shift 2; fi
  for w in "$@"; do
    if [ "$prev" = --run_name ]; then name=$w; fi
    if [ "$prev" = --nproc_per_node ] && [ "$1" = torchrun ]; then nproc=$w; fi
    if [[ $w == "$RUNS"/*/* ]]; then
      ref=${w#"$RUNS"/}
      ref=${ref%%/*}
      deps+=" ${LAST_ROW[$ref]:-}"
    fi
    prev=$w
  done
  if [ -z "$name" ]; then echo "run.sh: a row without --run_name: $*" >&2; exit 1; fi
  printf -v "ROW_CMD[$n]" '%q ' "$@" --logdir "$RUNS"
  ROW_CMD[n]=${ROW_CMD[n]% }
  ROW_NAME[n]=$name ROW_DONE[n]=$done ROW_NPROC[n]=$nproc ROW_DEPS[n]="${LAST_ROW[$name]:-}$deps"
  LAST_ROW[$name]=$n
}

seeds() { echo "${SEEDS:-$*}"; }  # DEFAULT...: the seeds of a protocol, unless --seeds gave others

suffix() { if [ "$1" = "$2" ]; then echo ""; else echo "-s$1"; fi; }  # SEED PAPER_SEED: the run name's seed suffix

is_done() {  # ROW
  local file=${ROW_DONE[$1]%%:*} key=""
  if [[ ${ROW_DONE[$1]} == *:* ]]; then key=${ROW_DONE[$1]#*:}; fi
  [ -f "$RUNS/${ROW_NAME[$1]}/$file" ] || return 1
  [ -z "$key" ] || grep -Eq "\"$key\": [^n]" "$RUNS/${ROW_NAME[$1]}/$file"
}

holds_run() {  # FOLDER: the scripts refuse to start a new run there without --resume
  local f
  for f in checkpoint.pt summary.json metrics.jsonl args.json; do [ -f "$1/$f" ] && return 0; done
  return 1
}

command_of() {  # ROW: set CMD to the row's command, plus --resume auto when its folder holds a run
  eval "CMD=(${ROW_CMD[$1]})"
  if holds_run "$RUNS/${ROW_NAME[$1]}" && [[ " ${ROW_CMD[$1]} " != *" --resume "* ]]; then
    CMD+=(--resume auto)
  fi
}

shown() { local s; printf -v s '%q ' "$@"; echo "${s% }"; }  # WORD...: one line that the shell reads back as WORD...

# A folder is worked on by one process at a time: $RUNS/<run_name>.lock holds "host pid" while a row runs (another
# run.sh on the same $RUNS skips it). A lock whose process is gone is stale and taken over.
held_by() {  # NAME: print the holder of NAME's lock and succeed, if it is alive (or on another host)
  local host="" pid=""
  [ -f "$RUNS/$1.lock" ] || return 1
  read -r host pid <"$RUNS/$1.lock" || true
  if [ "$host" = "$HOSTNAME" ] && [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
  echo "${host:-?} ${pid:-?}"
}

take_lock() {  # NAME
  local me="$HOSTNAME $BASHPID"
  if (set -C; echo "$me" >"$RUNS/$1.lock") 2>/dev/null; then return 0; fi
  if held_by "$1" >/dev/null; then return 1; fi
  rm -f "$RUNS/$1.lock"
  (set -C; echo "$me" >"$RUNS/$1.lock") 2>/dev/null
}

# ------------------------------------------------------------------------------------------------------------ runner
note() {  # EVENT NAME DETAIL: a line on stdout and in $RUNS/run.sh.log
  local line
  printf -v line '%s %s %s %s' "$(date '+%F %T')" "$1" "$2" "$3"
  echo "$line"
  echo "$line" >>"$RUNS/run.sh.log"
}

error_line() {  # FILE: the last line of a row's stderr that reads as an error, else its last non-empty line
  local line
  line=$(grep -E '^(error|[[:alnum:]_.]*(Error|Exception))(:|$)' "$1" | grep -v ChildFailedError | tail -n 1) || true
  if [ -z "$line" ]; then line=$(grep -v '^[[:space:]]*$' "$1" | tail -n 1) || true; fi
  echo "${line:-(nothing on stderr)}"
}

run_row() {  # ROW GPUS: one attempt at a row, as a background job in its own process group; exits with the
  # command's status (75: another process holds the folder). Output goes to $RUNS/<run_name>.log, stderr also to
  # $RUNS/.<run_name>.stderr for the error line.
  local i=$1 gpus=$2 name=${ROW_NAME[$1]} rc=0 start=$SECONDS
  local log=$RUNS/$name.log err=$RUNS/.$name.stderr
  if ! take_lock "$name"; then note busy "$name" "held by $(held_by "$name") ($RUNS/$name.lock)"; exit 75; fi
  if is_done "$i"; then rm -f "$RUNS/$name.lock"; note skip "$name" "(finished meanwhile)"; exit 0; fi
  command_of "$i"
  if [ -n "$gpus" ]; then export CUDA_VISIBLE_DEVICES=$gpus; fi
  note start "$name" "${gpus:+[gpu $gpus] }$(shown "${CMD[@]}")"
  echo "=== $(date '+%F %T') ${gpus:+CUDA_VISIBLE_DEVICES=$gpus }$(shown "${CMD[@]}")" >>"$log"
  { "${CMD[@]}" 2>&1 >&3 | tee "$err" >&3; } 3>>"$log" || rc=$?
  if (( rc == 0 )); then
    note done "$name" "in $(( SECONDS - start )) s"
  else
    note failed "$name" "exit $rc: $(error_line "$err") (log: $log)"
  fi
  rm -f "$err" "$RUNS/$name.lock"
  exit "$rc"
}

STATE=() ROW_PID=() ROW_SLOTS=() RUNNING=() FREE=()

start_row() {  # ROW NEED: take NEED free slots and start the row on them
  local ids=("${FREE[@]:0:$2}") gpus=""
  FREE=("${FREE[@]:$2}")
  if [ -n "$GPUS" ]; then gpus=$(IFS=,; echo "${ids[*]}"); fi
  set -m  # the job gets its own process group, so that stop() ends the command and everything it started
  run_row "$1" "$gpus" &
  set +m
  ROW_PID[$1]=$! ROW_SLOTS[$1]="${ids[*]}" STATE[$1]=running
  RUNNING+=("$1")
}

wait_for_a_row() {  # until a running row ends: record how it ended and free its slots
  local i j rc left=()
  while :; do
    for i in "${RUNNING[@]}"; do
      if (( ${#RUNNING[@]} == 1 )) || ! kill -0 "${ROW_PID[$i]}" 2>/dev/null; then
        rc=0
        wait "${ROW_PID[$i]}" || rc=$?
        case $rc in 0) STATE[i]=done ;; 75) STATE[i]=busy ;; *) STATE[i]=failed ;; esac
        FREE+=(${ROW_SLOTS[$i]})
        for j in "${RUNNING[@]}"; do if [ "$j" != "$i" ]; then left+=("$j"); fi; done
        RUNNING=("${left[@]}")
        return
      fi
    done
    sleep 1
  done
}

stop() {  # STATUS: a signal ends the running rows (their checkpoints stay, a rerun resumes them) and the runner
  trap '' INT TERM HUP
  local i
  for i in "${RUNNING[@]}"; do kill -TERM -- "-${ROW_PID[$i]}" 2>/dev/null || true; done
  wait || true
  for i in "${RUNNING[@]}"; do
    rm -f "$RUNS/${ROW_NAME[$i]}.lock" "$RUNS/.${ROW_NAME[$i]}.stderr"
    note stopped "${ROW_NAME[$i]}" "by a signal (a rerun continues it)"
  done
  exit "$1"
}

run_rows() {  # ROW...: in order, as slots free up. A row waiting for an earlier row lets the next rows go first; a
  # row waiting for more free GPUs holds the queue (so that a wide torchrun row is not starved by narrow ones).
  local pending=("$@") later i d need hold blocker waiting
  local slots=(one)  # without --gpus: one row at a time, CUDA_VISIBLE_DEVICES left as it is
  if [ -n "$GPUS" ]; then IFS=, read -r -a slots <<<"$GPUS"; fi
  FREE=("${slots[@]}")
  for i in "${pending[@]}"; do STATE[i]=pending; done
  trap 'stop 130' INT
  trap 'stop 143' TERM
  trap 'stop 129' HUP
  while (( ${#pending[@]} + ${#RUNNING[@]} > 0 )); do
    later=() hold=0
    for i in "${pending[@]}"; do
      if (( hold )); then later+=("$i"); continue; fi
      if is_done "$i"; then echo "$(date '+%F %T') skip ${ROW_NAME[$i]} (finished)"; STATE[i]=skipped; continue; fi
      blocker="" waiting=0
      for d in ${ROW_DEPS[$i]}; do
        case ${STATE[d]:-} in failed|busy) blocker=$d ;; pending|running) waiting=1 ;; esac
      done
      if [ -n "$blocker" ]; then
        note failed "${ROW_NAME[$i]}" "not run: it needs ${ROW_NAME[$blocker]}, which did not finish"
        STATE[i]=failed
        continue
      fi
      if (( waiting )); then later+=("$i"); continue; fi
      need=1
      if [ -n "$GPUS" ]; then need=${ROW_NPROC[$i]}; fi
      if (( need > ${#slots[@]} )); then
        note failed "${ROW_NAME[$i]}" "not run: it needs $need GPUs, --gpus lists ${#slots[@]}"
        STATE[i]=failed
        continue
      fi
      if (( need > ${#FREE[@]} )); then hold=1; later+=("$i"); continue; fi
      start_row "$i" "$need"
    done
    pending=("${later[@]}")
    if (( ${#RUNNING[@]} > 0 )); then wait_for_a_row; fi
  done
  trap - INT TERM HUP
}

# --------------------------------------------------------------------------------------------------------- arguments
methods="selftuning debiaspl metric_transfer usl metasemi"
usage_error() { echo "error: $*" >&2; exit 2; }
list=0 dry=0 only="" GPUS="" seeds_given="" gpus_given="" suites=()
while (( $# )); do
  case $1 in
    --list) list=1 ;;
    --dry-run) dry=1 ;;
    --only|--seeds|--gpus)
      if (( $# < 2 )); then usage_error "$1 needs a value"; fi
      case $1 in --only) only=$2 ;; --seeds) SEEDS=$2 seeds_given=1 ;; --gpus) GPUS=$2 gpus_given=1 ;; esac
      shift ;;
    -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    selftuning|debiaspl|metric_transfer|usl|metasemi|cpu) suites+=("$1") ;;
    -*) usage_error "unknown option '$1' (options: --list --dry-run --only REGEX --seeds \"1 2\" --gpus 0,1)" ;;
    *) usage_error "unknown method '$1' (choose from: $methods, cpu, or --list)" ;;
  esac
  shift
done
if [ -n "$seeds_given" ] && [[ ! $SEEDS =~ ^[[:space:]]*[0-9]+([[:space:]]+[0-9]+)*[[:space:]]*$ ]]; then
  usage_error "--seeds '$SEEDS': give whole numbers separated by spaces, e.g. --seeds \"1 2 3\""
fi
if [ -n "$gpus_given" ] && { [[ ! $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || [ -n "$(tr , '\n' <<<"$GPUS" | sort | uniq -d)" ]; }
then
  usage_error "--gpus '$GPUS': give distinct GPU ids separated by commas, e.g. --gpus 0,1,2,3"
fi
rc=0
[[ "" =~ $only ]] || rc=$?
if (( rc == 2 )); then usage_error "--only '$only' is not a valid regular expression"; fi
if (( ${#suites[@]} == 0 )); then read -r -a suites <<<"$methods"; fi

# ------------------------------------------------------------------------------------------------------------- main
for suite in "${suites[@]}"; do "$suite"; done
selected=()
for i in "${!ROW_NAME[@]}"; do
  if [[ ${ROW_CMD[$i]} =~ $only || ${ROW_NAME[$i]} =~ $only ]]; then selected+=("$i"); fi
done
if (( ${#selected[@]} == 0 )); then usage_error "--only '$only' matches no row of: ${suites[*]}"; fi

if (( list )); then
  for i in "${selected[@]}"; do printf '%s\t%s\n' "$RUNS/${ROW_NAME[$i]}" "${ROW_CMD[$i]}"; done
  exit 0
fi
if (( dry )); then
  for i in "${selected[@]}"; do
    command_of "$i"
    if is_done "$i"; then action=skip
    elif holder=$(held_by "${ROW_NAME[$i]}"); then action="busy ($holder)"
    elif holds_run "$RUNS/${ROW_NAME[$i]}"; then action=resume
    else action=run; fi
    printf '%s\t%s\t%s\n' "$action" "$RUNS/${ROW_NAME[$i]}" "$(shown "${CMD[@]}")"
  done
  exit 0
fi

mkdir -p "$RUNS"
note begin run.sh "${#selected[@]} rows of ${suites[*]}${only:+ matching $only}${GPUS:+ on GPUs $GPUS}"
run_rows "${selected[@]}"
counts=""
for state in done skipped failed busy; do
  n=0
  for i in "${selected[@]}"; do if [ "${STATE[i]}" = "$state" ]; then n=$((n + 1)); fi; done
  counts+="${counts:+, }$n $state"
done
note end run.sh "$counts"
for i in "${selected[@]}"; do
  case ${STATE[i]} in failed|busy) echo "some rows did not finish: see $RUNS/run.sh.log" >&2; exit 1 ;; esac
done
