"""ettin.report"""
