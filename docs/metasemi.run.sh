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
