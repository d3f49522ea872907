"""ettin.data"""
