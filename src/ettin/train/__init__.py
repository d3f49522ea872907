"""ettin.train"""
