from .loss_iic import IIC_EPS, iic_segmentation_loss

__all__ = ["IIC_EPS", "iic_segmentation_loss"]
