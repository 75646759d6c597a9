"""Tests of lifecycle.transfer: the rclone layer against the real binary."""
