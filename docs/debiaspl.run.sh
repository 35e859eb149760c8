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
