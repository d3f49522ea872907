"""ettin.eval"""
