"""Role switching: elastic workers that serve encode, prefill or decode as load asks, and the
router's controller that moves them."""
