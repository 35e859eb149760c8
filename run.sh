#!/usr/bin/env bash
# Every setting of the papers' tables, one command each.
#   bash run.sh              all of them, one after the other (weeks of GPU time: read before running)
#   bash run.sh selftuning   one method: selftuning | debiaspl | metric_transfer | usl | metasemi
#   bash run.sh --list       print every command, variables expanded, without running anything
# Datasets are expected under the --root each command names; pass --download where the command has it.
set -euo pipefail
cd "$(dirname "$0")"
if [ -x .venv/bin/python ]; then PATH="$PWD/.venv/bin:$PATH"; fi

selftuning() {
  # Self-Tuning (selftuning.py): every setting of the paper's tables (the reference's run.sh), plus the 100% label
  # column and the fine-tuning baseline of Table 1, run by the same script.
  # Fine-grained sets: ./CUB200, ./StanfordCars, ./Aircraft in the Self-Tuning layout (image_list/, train/, test/;
  # --download fetches the archives when the Tsinghua links are up). CIFAR-100: ./cifar100 (--download fetches it).
  # Shared by every run of the reference: ImageNet-pretrained backbone (torchvision IMAGENET1K_V1 weights, which
  # --pretrained fetches through the torch hub cache), K = 32 keys per class, 1024-d projector, lr 1e-3 (classifier
  # 1e-2), Nesterov SGD, wd 1e-4, 27005 iterations with the lr divided by 10 at 6k/12k/18k/24k, seed 666666.
  SELFTUNING="--queue_size 32 --projector_dim 1024 --pretrained"

  # Table 1, ResNet-50, batch 24: FGVC Aircraft, Stanford Cars, CUB-200-2011 at 15 / 30 / 50 % labels.
  for DATA in Aircraft StanfordCars CUB200; do
    for RATIO in 15 30 50; do
      python selftuning.py --root ./$DATA --label_ratio $RATIO --backbone resnet50 --batch_size 24 $SELFTUNING
    done
  done
  # Table 1, 100 % labels (not in the reference's run.sh, and its code crashes on the empty unlabeled set): the PGC
  # term on the labeled batch only.
  for DATA in Aircraft StanfordCars CUB200; do
    python selftuning.py --root ./$DATA --label_ratio 100 --backbone resnet50 --batch_size 24 $SELFTUNING
  done
  # Table 1's fine-tuning baseline, by the same pipeline (CE on the labeled batch only); the paper's FT row was not
  # produced by the released code (reference issue #6), so run it rather than quote it.
  for DATA in Aircraft StanfordCars CUB200; do
    for RATIO in 15 30 50 100; do
      python selftuning.py --root ./$DATA --label_ratio $RATIO --backbone resnet50 --batch_size 24 $SELFTUNING --no-pgc
    done
  done

  # Table 2, CIFAR-100 with EfficientNet-B2, batch 20, 400 / 2500 / 10000 labels; 32 -> 224 upsampling. The
  # reference always loads lukemelas' TF-ported B2 weights; --pretrained here loads torchvision's B2 (other weights).
  # --resize_interp: bicubic is modern Pillow's default; nearest is what the reference's pinned Pillow < 7 did.
  for N in 400 2500 10000; do
    python selftuning.py --root ./cifar100 --num_labeled $N --expand_label --backbone efficientnet_b2 \
      --batch_size 20 $SELFTUNING --resize_interp bicubic
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
  # DALI's RandAugment, not the reference's; drop --dali for the hand-written one).
  DEBIASPL_IMAGENET="--root imagenet --backbone resnet50 --pretrained pretrained/res50_moco_eman_800ep.pth.tar --eman
    --lr 0.003 --cos --warmup_epoch 5 --tau 0.4 --CLDLoss --multiviews --batch_size 64 --mu 5 --amp bf16 --dali"

  # ImageNet 0.2% (scripts/0.2perc-ssl/train_DebiasPL.sh; it names the labeled file train0.2p_index.csv, the CLIP
  # script train_0.2p_index.csv: use the name of the file you downloaded)
  torchrun --nproc_per_node 8 debiaspl.py $DEBIASPL_IMAGENET --trainindex_x train_0.2p_index.csv \
    --trainindex_u train_99.8p_index.csv --epochs 50 --threshold 0.8 --qhat_m 0.99 --lambda_cld 0.1 \
    --run_name debiaspl-imagenet-0.2p
  # ImageNet 0.2% with CLIP (scripts/0.2perc-ssl/train_DebiasPL_w_CLIP.sh; needs
  # imagenet/indexes/train_99.8p_index_clip_predictions_ranked.pth.tar); the README's 100-epoch 70.4% has no script
  torchrun --nproc_per_node 8 debiaspl.py $DEBIASPL_IMAGENET --trainindex_x train_0.2p_index.csv \
    --trainindex_u train_99.8p_index.csv --epochs 50 --threshold 0.7 --qhat_m 0.99 --lambda_cld 0.1 --use_clip \
    --run_name debiaspl-imagenet-0.2p-clip
  # ImageNet 1% (scripts/1perc-ssl/train_DebiasPL.sh)
  torchrun --nproc_per_node 8 debiaspl.py $DEBIASPL_IMAGENET --trainindex_x train_1p_index.csv \
    --trainindex_u train_99p_index.csv --epochs 50 --threshold 0.8 --qhat_m 0.999 --lambda_cld 0.3 \
    --run_name debiaspl-imagenet-1p
  # ImageNet 1% with CLIP, 100 epochs (scripts/1perc-ssl/train_DebiasPL_w_CLIP.sh)
  torchrun --nproc_per_node 8 debiaspl.py $DEBIASPL_IMAGENET --trainindex_x train_1p_index.csv \
    --trainindex_u train_99p_index.csv --epochs 100 --threshold 0.7 --qhat_m 0.99 --lambda_cld 0.3 --use_clip \
    --run_name debiaspl-imagenet-1p-clip
  # ImageNet zero-shot (scripts/zsl/train_DebiasPL_ImageNet.sh, 2 GPUs in the reference, same global batch): labels
  # are CLIP's PseudoLabel column, never the folder's (the reference trained on the ground truth by mistake)
  torchrun --nproc_per_node 2 debiaspl.py $DEBIASPL_IMAGENET --zero_shot --trainindex_x CLIPPseudoLabel0.95.csv \
    --trainindex_u CLIPPseudoLabel0.95-Unselected.csv --epochs 50 --threshold 0.8 --qhat_m 0.99 --lambda_cld 0.3 \
    --run_name debiaspl-imagenet-zsl

  # CIFAR-10, 40 and 250 labels, three label splits each (the FixMatch protocol: WRN-28-2 from scratch, 2^20
  # iterations with the cos(7 pi k / 16 K) decay; DebiasPL tau 0.4, q momentum 0.999; the student labels its own
  # weak views, as FixMatch). One GPU each.
  for labels in 40 250; do
    for seed in 0 1 2; do
      python debiaspl.py --root data/cifar10 --dataset cifar10 --download --num_labeled $labels --seed $seed \
        --backbone wrn28_2 --batch_size 64 --mu 7 --lr 0.03 --nesterov --weight_decay 5e-4 --threshold 0.95 \
        --lambda_u 1 --epochs 1024 --epoch_iters 1024 --tau 0.4 --qhat_m 0.999 --workers 4
    done
  done
}

metric_transfer() {
  # Deep Metric Transfer (metric_transfer.py): the README table of the reference (CIFAR-10, WRN-28-2, 50 to 8000 labels)
  # and ImageNet 1% (13,000 labels, ResNet-50). Stage A is trained once and shared by every label count; each label
  # count gets its own run folder (seeds, pseudo-labels, fine-tuning).

  # CIFAR-10 stage A (scripts/instance_cifar10.sh): instance discrimination, exact softmax over the 50,000-entry memory
  # bank (--nce_k 0), t 0.1, momentum 0.5, lr 0.03, SGDR T0=10 Tmult=2 over 1270 epochs (seven full cycles, ending at
  # the minimum), batch 128, wd 5e-4.
  python metric_transfer.py --stage pretrain --root data/cifar10 --download --backbone wrn28_2 \
    --pretrain_scheduler cosine-with-restart --epochs 1270 --run_name mt-cifar10-pretrain

  # CIFAR-10 stages B and C for every label count of the README table. The reference does not say which propagation
  # or pseudo_ratio each entry used (its one fine-tuning script: 250 labels, normalised-cut labels, ratio 0.2); spectral
  # and 0.2 throughout. Fine-tuning: lr 0.01 nesterov, wd 5e-4, cosine per iteration over 500,000 iterations, batch 128,
  # test every 500 iterations (summary.json: final_top1 and best_top1, the latter what the README reports).
  for n in 50 100 250 500 1000 2000 4000 8000; do
    python metric_transfer.py --stage propagate --root data/cifar10 --num_labeled $n --propagation spectral \
      --pretrained runs/mt-cifar10-pretrain/pretrain.pt --run_name mt-cifar10-$n
    python metric_transfer.py --stage finetune --root data/cifar10 --num_labeled $n --propagation spectral \
      --pseudo_ratio 0.2 --max_iter 500000 --pretrained runs/mt-cifar10-pretrain/pretrain.pt \
      --run_name mt-cifar10-$n --resume auto
  done
  # The kNN propagation rows of the notebooks (pseudo-label accuracy only): add to the same folders
  for n in 50 100 250 500 1000 2000 4000 8000; do
    python metric_transfer.py --stage propagate --root data/cifar10 --num_labeled $n --propagation knn \
      --pretrained runs/mt-cifar10-pretrain/pretrain.pt --run_name mt-cifar10-$n --resume auto
  done

  # ImageNet 1% (scripts/finetune_imagenet.sh with (13000, 0.1)): stage A is lemniscate's ResNet-50 (128-d head;
  # https://frontiers.blob.core.windows.net/pretraining/checkpoints/pil_pretrained_models/lemniscate/lemniscate_resnet50.pth
  # or the reference's pretrain_models/lemniscate_resnet50.pth.tar; both pickle a memory-bank object, hence
  # --trust_checkpoint). One global graph over all 1,281,167 images (the reference cut the class-ordered unlabeled set
  # into 10 chunks, which leaks the class structure: expect lower pseudo-label accuracy than its released files).
  torchrun --nproc_per_node 4 metric_transfer.py --stage propagate --root imagenet --backbone resnet50 \
    --pretrained pretrained/lemniscate_resnet50.pth.tar --trust_checkpoint --num_labeled 13000 \
    --propagation spectral --run_name mt-imagenet-1p
  # Fine-tuning: lr 0.01 nesterov, wd 0, batch 256, 50,000 iterations, x0.1 at 21,428 and 42,857, RandomResizedCrop 224.
  torchrun --nproc_per_node 4 metric_transfer.py --stage finetune --root imagenet --backbone resnet50 \
    --pretrained pretrained/lemniscate_resnet50.pth.tar --trust_checkpoint --num_labeled 13000 \
    --propagation spectral --pseudo_ratio 0.1 --batch_size 256 --max_iter 50000 --amp bf16 --dali \
    --run_name mt-imagenet-1p --resume auto
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
  FIXMATCH_CIFAR="--backbone wrn28_2 --batch_size 64 --mu 7 --lr 0.03 --nesterov --weight_decay 5e-4 --threshold 0.95
    --lambda_u 1 --epochs 1024 --epoch_iters 1024 --tau 0 --workers 4"

  # --- USL, CIFAR-10: 40, 100, 250 labels, k-means seeds 1..5 (configs/cifar10_usl.yaml; the intermediates are shared
  # through --cache_dir, so features and the kNN are computed once)
  for budget in 40 100 250; do
    for seed in 1 2 3 4 5; do
      python usl.py --root data/cifar10 --dataset cifar10 --download --pretrained pretrained/cifar10_ckpt_epoch_200.pth \
        --trust_checkpoint --budget $budget --seed $seed --cache_dir runs/usl-cifar10-cache
      python debiaspl.py --root data/cifar10 --dataset cifar10 $FIXMATCH_CIFAR \
        --trainindex_x runs/usl-cifar10-$budget-s$seed/selected.csv --run_name fixmatch-usl-cifar10-$budget-s$seed
    done
  done
  # the random baseline of the README (seeds 1, 2, 5 give its published lists)
  for seed in 1 2 5; do
    python usl.py --root data/cifar10 --dataset cifar10 --selection random --budget 40 --seed $seed
    python debiaspl.py --root data/cifar10 --dataset cifar10 $FIXMATCH_CIFAR \
      --trainindex_x runs/usl-cifar10-40-random-s$seed/selected.csv --run_name fixmatch-random-cifar10-40-s$seed
  done

  # --- USL, CIFAR-100: 400 labels (configs/cifar100_usl.yaml: lambda 1, alpha 1, horizon 1; WRN-28-8, wd 1e-3)
  for seed in 1 2 3 4 5; do
    python usl.py --root data/cifar100 --dataset cifar100 --download \
      --pretrained pretrained/cifar100_ckpt_epoch_200.pth --trust_checkpoint --budget 400 --seed $seed \
      --cache_dir runs/usl-cifar100-cache
    python debiaspl.py --root data/cifar100 --dataset cifar100 $FIXMATCH_CIFAR --backbone wrn28_8 --weight_decay 1e-3 \
      --trainindex_x runs/usl-cifar100-400-s$seed/selected.csv --run_name fixmatch-usl-cifar100-400-s$seed
  done

  # --- USL, ImageNet 0.2% (2,911 labels), seed 0: USL-MoCo (configs/ImageNet_usl_moco_0.2.yaml) and USL-CLIP
  # (ImageNet_usl_clip_0.2.yaml: CLIP ViT-B/16 features computed elsewhere, one row per image in ImageFolder order).
  # Dropping the authors' intermediates (memory_feats_list.npy, d_knns.npy, cluster_labels_2911_0.npy) into the run
  # folder reuses them, which is how the README reproduces the released selection.
  torchrun --nproc_per_node 8 usl.py --root imagenet --dataset imagenet --backbone resnet50 \
    --pretrained pretrained/res50_moco_eman_800ep.pth.tar --budget 2911 --seed 0 --dali --run_name usl-imagenet-moco-0.2p
  python usl.py --root imagenet --dataset imagenet --features clip_vitb16_feats.npy --budget 2911 --seed 0 \
    --reg_lambda 0.05 --reg_alpha 1.0 --reg_horizon_num 32 --reg_exclude_same_cluster --run_name usl-imagenet-clip-0.2p
  # FixMatch with an EMAN teacher from MoCo-EMAN (the paper's ImageNet protocol), on each selection
  for sel in moco clip; do
    torchrun --nproc_per_node 8 debiaspl.py --root imagenet --backbone resnet50 \
      --pretrained pretrained/res50_moco_eman_800ep.pth.tar --eman --lr 0.003 --cos --warmup_epoch 5 --epochs 50 \
      --threshold 0.7 --tau 0 --batch_size 64 --mu 5 --amp bf16 --dali \
      --trainindex_x runs/usl-imagenet-$sel-0.2p/selected.csv --trainindex_u runs/usl-imagenet-$sel-0.2p/unselected.csv \
      --run_name fixmatch-usl-$sel-imagenet-0.2p
  done

  # --- USL-T, CIFAR-10 40 / 100 / 250 and CIFAR-100 400 (usl-t_pretraining/configs: 200 epochs, batch 1024, Adam 1e-4)
  for budget in 40 100 250; do
    torchrun --nproc_per_node 4 usl_t.py --root data/cifar10 --dataset cifar10 --pretrained pretrained/kNN_cifar10/model.pth.tar \
      --neighbors pretrained/kNN_cifar10/topk-train-neighbors.npy --budget $budget
    python debiaspl.py --root data/cifar10 --dataset cifar10 $FIXMATCH_CIFAR \
      --trainindex_x runs/usl_t-cifar10-$budget-s42/selected.csv --run_name fixmatch-uslt-cifar10-$budget
  done
  torchrun --nproc_per_node 4 usl_t.py --root data/cifar100 --dataset cifar100 \
    --pretrained pretrained/kNN_cifar100/model.pth.tar --neighbors pretrained/kNN_cifar100/topk-train-neighbors.npy \
    --budget 400
  python debiaspl.py --root data/cifar100 --dataset cifar100 $FIXMATCH_CIFAR --backbone wrn28_8 --weight_decay 1e-3 \
    --trainindex_x runs/usl_t-cifar100-400-s42/selected.csv --run_name fixmatch-uslt-cifar100-400

  # --- USL-T, ImageNet 0.2%: 3000 clusters, heads only, 10 epochs, batch 2048 (ImageNet_usl-t_pretrain.yaml); the
  # densest image of the 2,911 largest clusters is labelled (selected.csv); pseudo_labels.csv spreads each label to the
  # cluster's 20 densest images (the reference's downstream SimCLRv2 fine-tuning trains on those)
  torchrun --nproc_per_node 8 usl_t.py --root imagenet --dataset imagenet --pretrained pretrained/kNN_imagenet/model.pth.tar \
    --neighbors pretrained/kNN_imagenet/topk-train-neighbors.npy --budget 2911 --workers 16
  torchrun --nproc_per_node 8 debiaspl.py --root imagenet --backbone resnet50 \
    --pretrained pretrained/res50_moco_eman_800ep.pth.tar --eman --lr 0.003 --cos --warmup_epoch 5 --epochs 50 \
    --threshold 0.7 --tau 0 --batch_size 64 --mu 5 --amp bf16 --dali \
    --trainindex_x runs/usl_t-imagenet-2911-s42/selected.csv --trainindex_u runs/usl_t-imagenet-2911-s42/unselected.csv \
    --run_name fixmatch-uslt-imagenet-0.2p
}

metasemi() {
  # MetaSemi (metasemi.py): the four settings of the paper (README and run.sh history of Sakura03/SemiMeta).
  # CIFAR/SVHN: one GPU, ConvLarge, mixup, 400k iterations (lr 0.1, warmup and consistency ramp-up 4000, x0.1 at
  # 300k and 350k), batch 128 labeled + 128 unlabeled, epsilon 0.01; --download fetches the data into --root.
  # These are the defaults, spelled out so the line reads as the recipe.
  METASEMI_SMALL="--arch convlarge --mix_up --total_steps 400000 --milestones 300000 350000 --lr 0.1 --warmup 4000
    --weight 1.0 --batch_size 128 --epsilon 0.01 --meta_grad fd"

  # SVHN-1000 (train split only, not extra; no horizontal flip): paper 3.15 % error
  python metasemi.py --root data/svhn --dataset svhn --download --num_label 1000 $METASEMI_SMALL --alpha 0.1 \
    --seed 7788 --weight_decay 5e-5
  # CIFAR-10-4000: paper 7.78 % error
  python metasemi.py --root data/cifar10 --dataset cifar10 --download --num_label 4000 $METASEMI_SMALL --alpha 1.0 \
    --seed 8469 --weight_decay 1e-4
  # CIFAR-100-10000: paper 30.74 % error
  python metasemi.py --root data/cifar100 --dataset cifar100 --download --num_label 10000 $METASEMI_SMALL --alpha 1.0 \
    --seed 7788 --weight_decay 1e-4

  # ImageNet 10 %, ResNet-18, 8 GPUs x (64 labeled + 64 unlabeled), DALI, 600 unlabeled epochs, cosine with 5 warmup
  # epochs: paper 44.87 % top-1 / 18.88 % top-5 error. The reference's split files are not public: either pack your
  # own split as RecordIO (imagenet_rec/{train_label,train_unlabel,val}.rec/.idx, e.g.
  #   python -m common.dali pack imagenet/labeled imagenet_rec/train_label --classes_from imagenet/train
  #   python -m common.dali pack imagenet/unlabeled imagenet_rec/train_unlabel --classes_from imagenet/train
  #   python -m common.dali pack imagenet/val imagenet_rec/val --classes_from imagenet/train )
  torchrun --nproc_per_node 8 metasemi.py --root imagenet_rec --dataset imagenet --arch resnet18 --dali \
    --batch_size 512 --lr 0.1 --weight_decay 1e-4 --epochs 600 --warmup 5 --alpha 1.0 --epsilon 0.01
  # or draw a class-balanced 10 % split (128 per class = 128,000 images) from the seed out of imagenet/train
  torchrun --nproc_per_node 8 metasemi.py --root imagenet --dataset imagenet --num_label 128000 --arch resnet18 --dali \
    --batch_size 512 --lr 0.1 --weight_decay 1e-4 --epochs 600 --warmup 5 --alpha 1.0 --epsilon 0.01

  # Ablation of the paper (slides p.18) on CIFAR-10-4000: the meta step without mixup (paper 11.63 %), and mixup with
  # the eval-mode predictions as soft targets, no meta step and no consistency term (train_baseline.py --mix-up,
  # paper 11.10 %)
  python metasemi.py --root data/cifar10 --dataset cifar10 --num_label 4000 $METASEMI_SMALL --no-mix_up --seed 8469 \
    --run_name metasemi-cifar10-4000-nomixup
  python metasemi.py --root data/cifar10 --dataset cifar10 --num_label 4000 $METASEMI_SMALL --no-meta --weight 0 \
    --alpha 1.0 --seed 8469 --run_name metasemi-cifar10-4000-nometa
  # The exact meta-gradient instead of the finite difference (same recipe)
  python metasemi.py --root data/cifar10 --dataset cifar10 --num_label 4000 $METASEMI_SMALL --alpha 1.0 --seed 8469 \
    --meta_grad jvp --run_name metasemi-cifar10-4000-jvp
}

methods="selftuning debiaspl metric_transfer usl metasemi"
case "${1:-all}" in
  all) for m in $methods; do "$m"; done ;;
  --list)
    python() { echo "python $*"; }
    torchrun() { echo "torchrun $*"; }
    for m in $methods; do "$m"; done ;;
  selftuning|debiaspl|metric_transfer|usl|metasemi) "$1" ;;
  *) echo "error: unknown method '$1' (choose from: $methods, or --list)" >&2; exit 2 ;;
esac
