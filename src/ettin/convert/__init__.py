"""ettin.convert"""
