"""Object detection and instance segmentation (torchvision Mask R-CNN) on COCO-format shards."""
